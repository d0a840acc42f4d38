"""A sandbox's network rule as E2B's and Modal's own egress controls: the same rule on every provider.

A hosted sandbox runs on the provider's network, never the worker's, so the worker's own addresses are not its
neighbours; what is left to enforce is the rule itself, with the provider's controls:

* E2B (``AsyncSandbox.create``): off = ``allow_internet_access=False``; internet = on, with ``network.deny_out``
  listing the private, link-local (cloud metadata) and other internal ranges; allowlist = ``network.allow_out``
  with the hosts (names, ``*.`` wildcards and IPs are E2B's own syntax) and ``deny_out: [0.0.0.0/0]``.
* Modal (``Sandbox.create``): off = ``block_network=True``; internet = open; allowlist =
  ``outbound_domain_allowlist`` (names and ``*.`` wildcards) plus ``outbound_cidr_allowlist`` (IP entries, /32).

A rule the installed SDK cannot express (an SDK too old for the parameter) is refused with a message saying what
to install, never silently widened.
"""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Callable
from typing import Any

from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.network.addresses import FORBIDDEN_V4
from tardigrade.sandboxes.network.rules import NetworkRule

ALL_IPV4 = "0.0.0.0/0"


def _accepts(function: Callable[..., Any], parameter: str) -> bool:
    try:
        return parameter in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _split(hosts: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(names and wildcards, IP networks as CIDRs)."""
    names, cidrs = [], []
    for host in hosts:
        try:
            cidrs.append(str(ipaddress.ip_network(host)))
        except ValueError:
            names.append(host)
    return names, cidrs


def e2b_create_options(rule: NetworkRule, create: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for E2B's ``AsyncSandbox.create`` that enforce ``rule``."""
    if rule.mode == "off":
        return {"allow_internet_access": False}
    if create is not None and not _accepts(create, "network"):
        raise SandboxError(
            f"sandbox.network is {rule.to_json()!r}, but the installed e2b SDK has no egress rules (`network=`);"
            " upgrade it (pip install -U 'tardigrade-temporal[e2b]') or use `network: false`"
        )
    if rule.mode == "internet":
        return {"allow_internet_access": True, "network": {"deny_out": [str(n) for n in FORBIDDEN_V4]}}
    names, cidrs = _split(rule.allow)
    return {"allow_internet_access": True, "network": {"allow_out": [*names, *cidrs], "deny_out": [ALL_IPV4]}}


def modal_create_options(rule: NetworkRule, create: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for Modal's ``Sandbox.create`` that enforce ``rule``."""
    if rule.mode == "off":
        return {"block_network": True}
    if rule.mode == "internet":
        return {"block_network": False}
    names, cidrs = _split(rule.allow)
    if names and create is not None and not _accepts(create, "outbound_domain_allowlist"):
        raise SandboxError(
            f"sandbox.network allows hosts by name ({', '.join(names)}), but the installed modal SDK only takes"
            " CIDR allowlists; upgrade it (pip install -U 'tardigrade-temporal[modal]'), list IP addresses instead,"
            " or run this pipeline on the local or e2b provider"
        )
    options: dict[str, Any] = {"block_network": False, "outbound_cidr_allowlist": cidrs}
    if names:
        options["outbound_domain_allowlist"] = names
    return options
