"""The worker operator's network rules: which ``network:`` modes pipelines may use, and what stays reachable.

One field of the worker policy (sandboxes/policy.py, ``network:``)::

    network:
      modes: [off, internet, allow]     # which sandbox.network values pipelines may use (default: all three)
      hosts: ["*.pypi.org", pypi.org]   # if set, every host a pipeline's allowlist names must match one of these
      reachable: ["10.8.0.5:3128", "10.9.0.0/16"]   # internal addresses sandboxes may still reach (mirrors, tests)

Everything internal (the worker's own addresses and subnets, loopback, link-local, private ranges) is unreachable
from a sandbox unless ``reachable`` lists it. An entry with a port is honoured by the egress proxy (allowlist mode)
only; an address or CIDR without a port is also routed for ``network: true`` sandboxes (routes have no ports).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tardigrade.sandboxes.network.addresses import IPAddress, IPNetwork, unmapped
from tardigrade.sandboxes.network.rules import MODES, NetworkMode, NetworkRule, check_host_pattern, host_matches


@dataclass(frozen=True)
class Reachable:
    """An internal destination the operator lets sandboxes reach: a network, and one port or (None) all ports."""

    network: IPNetwork
    port: int | None

    @classmethod
    def parse(cls, text: str) -> Reachable:
        """``10.0.0.5``, ``10.0.0.0/8``, ``10.0.0.5:8080``, ``[fd00::5]:8080`` or ``fd00::/8``."""
        raw = text.strip()
        port: int | None = None
        address = raw
        if raw.startswith("["):
            address, _, rest = raw[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"{text!r}: expected [address]:port")
                port = _port(rest[1:], text)
        elif raw.count(":") == 1:
            address, _, port_text = raw.partition(":")
            port = _port(port_text, text)
        try:
            network = ipaddress.ip_network(address, strict=False)
        except ValueError:
            raise ValueError(
                f"{text!r} is not an IP address, CIDR or address:port (names are not allowed: they can change)"
            ) from None
        return cls(network, port)

    def covers(self, address: IPAddress, port: int) -> bool:
        address = unmapped(address)
        return address.version == self.network.version and address in self.network and self.port in (None, port)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: the port must be a number from 1 to 65535")
    return int(text)


class NetworkPolicy(BaseModel):
    """Which network rules pipelines may use on this worker, and which internal destinations stay reachable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    modes: list[NetworkMode] = Field(
        default_factory=lambda: list(MODES),
        description="Which sandbox.network values pipelines may use: off (false), internet (true), allow"
        " ({allow: [...]}). Default: all three (none of them reaches the worker).",
    )
    hosts: list[str] | None = Field(
        default=None,
        description="If set, every host in a pipeline's network allowlist must match one of these patterns"
        " (pypi.org, *.github.com). Default: any public host.",
    )
    reachable: list[str] = Field(
        default_factory=list,
        description="Internal destinations sandboxes may still reach: address, CIDR or address:port. Default:"
        " none (the worker, loopback, link-local, cloud metadata and private ranges are unreachable).",
    )

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        return [check_host_pattern(h, f"[{i}]") for i, h in enumerate(v)]

    @field_validator("reachable")
    @classmethod
    def _reachable(cls, v: list[str]) -> list[str]:
        for i, entry in enumerate(v):
            try:
                Reachable.parse(entry)
            except ValueError as e:
                raise ValueError(f"[{i}] {e}") from None
        return v

    @property
    def exceptions(self) -> tuple[Reachable, ...]:
        return tuple(Reachable.parse(entry) for entry in self.reachable)

    def violation(self, rule: NetworkRule) -> tuple[str, str, str] | None:
        """``(policy rule, problem, fix)`` if ``rule`` is not allowed here, else None. The caller names the
        pipeline field (sandboxes/policy.py turns this into a `PolicyViolation`)."""
        if rule.mode not in self.modes:
            allowed = ", ".join(self.modes) or "none"
            return (
                "network.modes",
                f"asks for network mode {rule.mode!r} (allowed: {allowed})",
                "use an allowed mode, or ask the worker's operator to add it to network.modes in the policy file",
            )
        if rule.mode == "allow" and self.hosts is not None:
            for host in rule.allow:
                if not any(_pattern_within(host, allowed) for allowed in self.hosts):
                    return (
                        "network.hosts",
                        f"allows host {host!r}, which is not among the worker's network.hosts",
                        "remove it, or ask the worker's operator to add it to network.hosts in the policy file",
                    )
        return None


def _pattern_within(pattern: str, allowed: str) -> bool:
    """Whether every host ``pattern`` matches is also matched by ``allowed``."""
    if pattern.startswith("*."):
        return allowed.startswith("*.") and (pattern == allowed or host_matches(allowed, pattern[2:]))
    return host_matches(allowed, pattern)
