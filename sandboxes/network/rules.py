"""What a pipeline's ``sandbox.network`` says, validated: off, internet, or an allowlist of hosts.

``false`` (the default) gives a sandbox no network at all; ``true`` gives it the internet but never the worker or
its neighbours; ``{allow: ["pypi.org", "*.github.com"]}`` lets it reach those hosts only, through the worker's
egress proxy. A host pattern is a DNS name (``pypi.org`` matches itself only), a ``*.`` suffix rule
(``*.github.com`` matches every name below github.com, not github.com itself) or an IP address. Kept free of
pydantic and Temporal so the pipeline model, the providers and the proxy share one parser.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

NetworkMode = Literal["off", "internet", "allow"]
MODES: tuple[NetworkMode, ...] = ("off", "internet", "allow")
MAX_ALLOW = 256

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class NetworkRuleError(ValueError):
    """A ``network:`` value (or a host pattern in it) that cannot be used; the message names the field."""


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets: the form names are compared in."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def check_host_pattern(pattern: Any, field: str) -> str:
    """One allowlist entry, normalized; anything else (a URL, a port, a bare ``*``, ``*`` inside a name) is refused
    with a message naming ``field``."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise NetworkRuleError(f"{field} must be a host name such as pypi.org or *.github.com, got {pattern!r}")
    host = normalize_host(pattern)
    hint = "write just the host name, such as pypi.org or *.github.com"
    if "://" in host or "/" in host or "@" in host:
        raise NetworkRuleError(f"{field} is {pattern!r}: a URL or path is not a host; {hint}")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host:
        raise NetworkRuleError(f"{field} is {pattern!r}: ports are not part of a host rule; {hint}")
    name = host[2:] if host.startswith("*.") else host
    if "*" in name:
        raise NetworkRuleError(f"{field} is {pattern!r}: '*' may only start a rule, as in *.github.com; {hint}")
    labels = name.split(".")
    if host.startswith("*.") and len(labels) < 2:
        raise NetworkRuleError(f"{field} is {pattern!r}: a wildcard needs a domain below it, as in *.github.com")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise NetworkRuleError(f"{field} is {pattern!r}, which is not a valid host name; {hint}")
    return host


def host_matches(pattern: str, host: str) -> bool:
    """``pypi.org`` matches itself only; ``*.github.com`` matches any name below github.com, not github.com."""
    pattern, host = normalize_host(pattern), normalize_host(host)
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


@dataclass(frozen=True)
class NetworkRule:
    """A sandbox's network, as the provider applies it. ``allow`` is set only for mode ``allow``."""

    mode: NetworkMode = "off"
    allow: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: Any, field: str = "sandbox.network") -> NetworkRule:
        """``false``/``true``/``{allow: [...]}`` (or a rule already parsed) -> a rule; anything else is refused
        with a one-line message naming ``field``."""
        if isinstance(value, NetworkRule):
            return value
        if value is None or value is False:
            return cls("off")
        if value is True:
            return cls("internet")
        if not isinstance(value, Mapping) and isinstance(getattr(value, "allow", None), list | tuple):
            value = {"allow": list(value.allow)}  # the pipeline model's NetworkAllow
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"allow"})
            if unknown:
                raise NetworkRuleError(
                    f"{field} has unknown key(s) {', '.join(map(str, unknown))}; the only key is `allow`, a list of"
                    " hosts such as [pypi.org, '*.github.com']"
                )
            hosts = value.get("allow")
            if not isinstance(hosts, list | tuple) or not hosts:
                raise NetworkRuleError(
                    f"{field}.allow must be a non-empty list of hosts such as [pypi.org, '*.github.com']"
                    " (use `network: false` for no network)"
                )
            if len(hosts) > MAX_ALLOW:
                raise NetworkRuleError(f"{field}.allow lists {len(hosts)} hosts; at most {MAX_ALLOW} are allowed")
            checked = [check_host_pattern(h, f"{field}.allow[{i}]") for i, h in enumerate(hosts)]
            return cls("allow", tuple(dict.fromkeys(checked)))
        raise NetworkRuleError(
            f"{field} must be false (no network), true (internet, never the worker) or {{allow: [hosts]}},"
            f" got {value!r}"
        )

    def allows_host(self, host: str) -> bool:
        if self.mode == "internet":
            return True
        return self.mode == "allow" and any(host_matches(p, host) for p in self.allow)

    def to_json(self) -> bool | dict[str, list[str]]:
        """The pipeline-file form (what `parse` reads back)."""
        if self.mode == "allow":
            return {"allow": list(self.allow)}
        return self.mode == "internet"

    def describe(self) -> str:
        if self.mode == "allow":
            return f"allow {', '.join(self.allow)}"
        return self.mode


def host_patterns(patterns: Iterable[Any], field: str) -> tuple[str, ...]:
    """A list of host patterns checked one by one (for policies and other callers)."""
    return tuple(check_host_pattern(p, f"{field}[{i}]") for i, p in enumerate(patterns))
