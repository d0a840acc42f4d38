"""Which addresses a sandbox must never reach: the worker's own, its neighbours', and every non-public range.

Used twice with one meaning: as prohibit routes inside a sandbox's network namespace (``network: true``,
namespace.py) and as the egress proxy's check of every address a name resolves to (``network: {allow: ...}``,
proxy.py). The worker's own addresses and the subnets it is directly attached to are read from /proc (no
dependency beyond Linux itself), fresh each time: interfaces come and go.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct
from collections.abc import Iterable
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never the internet: "this network", private (RFC 1918), carrier-grade NAT (often a cloud's internal network),
# loopback, link-local (cloud metadata at 169.254.169.254 lives here), IETF-reserved, test, benchmarking,
# multicast, reserved and broadcast ranges; the IPv6 equivalents, and the IPv4-mapped/translated forms of all.
FORBIDDEN_V4: tuple[ipaddress.IPv4Network, ...] = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
        "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    )
)  # fmt: skip
FORBIDDEN_V6: tuple[ipaddress.IPv6Network, ...] = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001:db8::/32",
        "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)  # fmt: skip


def worker_addresses() -> set[IPAddress]:
    """Every address assigned to an interface of the worker (its current network namespace)."""
    found: set[IPAddress] = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        lines = []
    for previous, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL":
            found.add(ipaddress.IPv4Address(previous.strip().removeprefix("|-- ").strip()))
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    except (OSError, IndexError, ValueError):
        pass
    return found


def worker_subnets() -> set[ipaddress.IPv4Network]:
    """The IPv4 subnets the worker is directly attached to (its neighbours: other hosts on its LAN)."""
    nets: set[ipaddress.IPv4Network] = set()
    try:
        rows = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return nets
    for row in rows:
        cols = row.split()
        if len(cols) < 8 or cols[2] != "00000000":  # a route via a gateway leads elsewhere, not to a neighbour
            continue
        dest, mask = (ipaddress.IPv4Address(struct.pack("<I", int(c, 16))) for c in (cols[1], cols[7]))
        if int(mask) == 0:
            continue
        nets.add(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return nets


def unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:10.0.0.1`` is 10.0.0.1: judge the IPv4 address an IPv4-mapped one really connects to."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_internal(address: IPAddress, own: Iterable[IPAddress] = (), subnets: Iterable[IPNetwork] = ()) -> bool:
    """True for any address that is not plainly on the public internet, or that belongs to the worker."""
    address = unmapped(address)
    if address in set(own):
        return True
    ranges: Iterable[IPNetwork] = FORBIDDEN_V4 if address.version == 4 else FORBIDDEN_V6
    return any(address in net for net in (*ranges, *subnets) if net.version == address.version)
