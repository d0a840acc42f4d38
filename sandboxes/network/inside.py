"""Runs as a short-lived helper process inside a sandbox's user and network namespaces, to set that network up.

Started by namespace.py as ``python -I inside.py USERNS_FD NETNS_FD`` with a JSON job on stdin. It joins both
namespaces with setns(2) itself and does its work without exec'ing anything: the worker owns the sandbox's user
namespace, so this process holds every capability there, but the worker's uid is mapped to the sandbox's
non-root uid inside, so an exec would drop them (which is why ``nsenter ... ip route`` does not work here). Jobs:

* ``{"routes": [[type, "cidr", gateway|null, device|null], ...]}``: add routes through rtnetlink (``prohibit``
  routes, and ``unicast`` host routes via slirp's gateway),
* ``{"listen": port, "socket_fd": N}``: bring ``lo`` up, listen on 127.0.0.1:port there and pass the listening
  socket to the worker over the unix socket N (SCM_RIGHTS).

Standard library only, no tardigrade imports: it must start fast and run in a process that has just entered a
namespace. Exits non-zero with one line on stderr on any failure.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import socket
import struct
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
RTM_NEWROUTE = 24
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x200, 0x400
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST, RTN_PROHIBIT = 1, 8
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def enter(user_fd: int, net_fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for fd, kind in ((user_fd, CLONE_NEWUSER), (net_fd, CLONE_NEWNET)):
        if libc.setns(fd, kind) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns: {os.strerror(code)}")


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("HH", length, kind) + data + b"\0" * (-length % 4)


def add_routes(routes: list[list[str | None]]) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
    try:
        for seq, (kind, cidr, gateway, device) in enumerate(routes, start=1):
            assert cidr is not None
            net = ipaddress.ip_network(cidr)
            family = socket.AF_INET if net.version == 4 else socket.AF_INET6
            route_type = RTN_PROHIBIT if kind == "prohibit" else RTN_UNICAST
            body = struct.pack(
                "BBBBBBBBI", family, net.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, route_type, 0
            )
            body += _attr(RTA_DST, net.network_address.packed)
            if gateway:
                body += _attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
            if device:
                body += _attr(RTA_OIF, struct.pack("I", socket.if_nametoindex(device)))
            # A reachable network replaces a prohibit route of the same prefix; a prohibit never replaces anything.
            flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | (NLM_F_EXCL if kind == "prohibit" else NLM_F_REPLACE)
            sock.send(struct.pack("IHHII", 16 + len(body), RTM_NEWROUTE, flags, seq, 0) + body)
            reply = sock.recv(65536)
            _, kind_back, _, _, _ = struct.unpack("IHHII", reply[:16])
            if kind_back == NLMSG_ERROR:
                (code,) = struct.unpack("i", reply[16:20])
                if code != 0 and -code != errno.EEXIST:
                    raise OSError(-code, f"adding route {kind} {cidr}: {os.strerror(-code)}")
    finally:
        sock.close()


def listen(port: int, socket_fd: int) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flags = struct.unpack("16sh", fcntl.ioctl(probe, SIOCGIFFLAGS, struct.pack("16sh", b"lo", 0)))[1]
    fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    socket.send_fds(socket.socket(fileno=socket_fd), [b"L"], [listener.fileno()])


def main() -> None:
    enter(int(sys.argv[1]), int(sys.argv[2]))
    job = json.loads(sys.stdin.read())
    if "routes" in job:
        add_routes(job["routes"])
    if "listen" in job:
        listen(int(job["listen"]), int(job["socket_fd"]))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one line for the worker's error message, no traceback
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
