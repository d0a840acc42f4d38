"""A bubblewrap command's own network: user-mode internet from slirp4netns, or loopback plus the egress proxy.

Every command of the local provider gets a fresh network namespace (``bwrap --unshare-net``); the worker's
namespace is never shared. For ``internet`` and ``allow`` rules the worker sets that namespace up between
bubblewrap's clone and the command's exec, using bubblewrap's own handshake:

1. bwrap starts with ``--info-fd W --block-fd R``: it reports the sandbox's pid on W, then waits on R.
2. The worker opens the pid's network namespace and, through ``NS_GET_USERNS``, the user namespace that owns it
   (bubblewrap may already have moved the process into a nested one, whose capabilities would not cover it).
   The worker created that user namespace, so a helper process it starts (inside.py, which joins both with
   setns(2) and never execs) holds CAP_NET_ADMIN there; the sandbox's own processes hold no capability in it.
3. ``internet``: the helper adds ``prohibit`` routes for every internal range, the worker's own addresses and its
   subnets (addresses.py) and slirp's host alias 10.0.2.2, *before* slirp4netns exists; then ``slirp4netns
   --configure --disable-host-loopback`` adds tap0 with a default route via 10.0.2.2 (DNS at 10.0.2.3), and the
   policy's reachable networks get host routes through the gateway. A connect to anything internal fails at once
   inside the sandbox (EACCES) and never leaves it. ``/etc/resolv.conf`` points at slirp's DNS.
   ``allow``: a helper brings ``lo`` up, makes a listening socket on 127.0.0.1:3128 inside the namespace and
   passes it to the worker (SCM_RIGHTS); the worker's `EgressProxy` accepts on it. There is no other interface.
4. Only then the worker writes to R and the command starts. If a step fails, R is never written and bwrap is
   killed, so a command never runs with half a network (if the worker itself dies meanwhile, ``--die-with-parent``
   ends bwrap, and the prohibit routes were in place before any interface existed). slirp4netns gets
   ``--exit-fd`` (it exits when the worker does) and is killed when the command ends.

Needed on the worker for ``internet``: slirp4netns (Debian: slirp4netns) and a /dev/net/tun the worker's user may
open (mode 0666, the usual default). Missing ones make the rule refuse with a message naming the package; nothing
ever falls back to the worker's namespace. ``allow`` needs nothing beyond bubblewrap and Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tardigrade.sandboxes.errors import IsolationUnavailable, SandboxError
from tardigrade.sandboxes.network.addresses import FORBIDDEN_V4, worker_addresses, worker_subnets
from tardigrade.sandboxes.network.policy import NetworkPolicy
from tardigrade.sandboxes.network.proxy import PROXY_PORT, BrokerHook, EgressProxy
from tardigrade.sandboxes.network.rules import NetworkRule

NS_GET_USERNS = 0xB701  # ioctl: the user namespace that owns a namespace
SLIRP_GATEWAY = "10.0.2.2"  # slirp's alias for the host's loopback (refused by --disable-host-loopback)
SLIRP_DNS = "10.0.2.3"
SETUP_TIMEOUT = 20.0
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"

INSIDE_HELPER = Path(__file__).with_name("inside.py")


def missing_tools(rule: NetworkRule) -> list[str]:
    """What the worker lacks for ``rule`` (package names with the reason), empty if nothing."""
    if rule.mode == "off":
        return []
    missing = []
    if rule.mode == "internet":
        if shutil.which("slirp4netns") is None:
            missing.append("slirp4netns (apt-get install -y slirp4netns)")
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            missing.append("/dev/net/tun that the worker's user can open (modprobe tun; chmod 0666 /dev/net/tun)")
    return missing


def require_tools(rule: NetworkRule, field: str = "sandbox.network") -> None:
    """Refuse ``rule`` on this worker, with what to install, if its tools are missing."""
    missing = missing_tools(rule)
    if missing:
        raise IsolationUnavailable(
            f"{field} is {rule.to_json()!r}, which needs on this worker: {'; '.join(missing)}. Install them, or use"
            " `network: false`; a sandbox never falls back to the worker's own network"
        )


def prohibit_routes(policy: NetworkPolicy) -> list[list[str | None]]:
    """Routes (for inside.py) that make everything internal unreachable inside a namespace (before slirp starts)."""
    nets: set[ipaddress.IPv4Network] = set(FORBIDDEN_V4) | worker_subnets()
    nets |= {ipaddress.IPv4Network(a) for a in worker_addresses() if a.version == 4}
    nets.add(ipaddress.IPv4Network(f"{SLIRP_GATEWAY}/32"))
    # What the operator made reachable wins over a narrower prohibit (its route via the gateway is added later).
    opened = [e.network for e in policy.exceptions if e.port is None and e.network.version == 4]
    nets = {n for n in nets if not any(n.subnet_of(o) for o in opened if o.version == 4)}
    return [["prohibit", str(net), None, None] for net in sorted(nets, key=lambda n: (n.prefixlen, n))]


def exception_routes(policy: NetworkPolicy) -> list[list[str | None]]:
    """Routes via slirp's gateway for the networks the policy keeps reachable (portless entries only)."""
    return [
        ["unicast", str(e.network), SLIRP_GATEWAY, "tap0"]
        for e in policy.exceptions
        if e.port is None and e.network.version == 4
    ]


class CommandNetwork:
    """The network of one bubblewrap command. Use: ``bwrap_args``/``pass_fds``/``env`` to build the command,
    ``after_spawn`` right after starting it, ``start`` to configure and release it, ``close`` when it ended."""

    def __init__(
        self,
        rule: NetworkRule,
        policy: NetworkPolicy,
        state_dir: Path,
        *,
        broker: BrokerHook | None = None,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        require_tools(rule)
        self.rule = rule
        self.policy = policy
        self.state_dir = state_dir
        self.broker = broker
        self.proxy: EgressProxy | None = None
        if rule.mode == "allow" or broker is not None:
            self.proxy = EgressProxy(rule, policy, broker=broker, on_refusal=on_refusal)
        self._info_r: int | None = None
        self._info_w: int | None = None
        self._block_r: int | None = None
        self._block_w: int | None = None
        self._slirp: asyncio.subprocess.Process | None = None
        self._slirp_exit_w: int | None = None  # held open: slirp4netns exits when it closes (the worker died)
        self._ns_fds: list[int] = []

    @property
    def pass_fds(self) -> tuple[int, ...]:
        if self._info_w is None:  # made on first use, so an unused CommandNetwork holds nothing to close
            self._info_r, self._info_w = os.pipe()  # not inheritable: only pass_fds reach bwrap
            self._block_r, self._block_w = os.pipe()
        assert self._info_w is not None and self._block_r is not None
        return (self._info_w, self._block_r)

    def bwrap_args(self) -> list[str]:
        info_w, block_r = self.pass_fds
        args = ["--unshare-net", "--info-fd", str(info_w), "--block-fd", str(block_r)]
        if self.rule.mode == "internet":
            resolv = self.state_dir / "resolv.conf"
            resolv.write_text(f"nameserver {SLIRP_DNS}\n")
            args += ["--ro-bind", str(resolv), "/etc/resolv.conf"]
        return args

    def env(self) -> dict[str, str]:
        """Variables that point clients at the egress proxy (when there is one)."""
        if self.proxy is None:
            return {}
        no_proxy = "localhost,127.0.0.1,::1"
        return {
            "HTTP_PROXY": PROXY_URL, "HTTPS_PROXY": PROXY_URL, "http_proxy": PROXY_URL, "https_proxy": PROXY_URL,
            "NO_PROXY": no_proxy, "no_proxy": no_proxy,
        }  # fmt: skip

    def after_spawn(self) -> None:
        """Close the ends bwrap now holds, so a dead bwrap shows as EOF."""
        self._close_fd("_info_w")
        self._close_fd("_block_r")

    def _close_fd(self, name: str) -> None:
        fd = getattr(self, name)
        setattr(self, name, None)  # never closed twice: the number may belong to someone else by then
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    async def start(self) -> bool:
        """Configure the command's namespace and let the command run. False if bwrap died before reporting its
        child, or it and its child died while the namespace was being configured (it then fails on its own, with
        its exit status and message, without ever running the command)."""
        assert self._info_r is not None and self._block_w is not None
        info = await asyncio.wait_for(asyncio.to_thread(_read_all, self._info_r), SETUP_TIMEOUT)
        if not info:
            return False
        try:
            pid = int(json.loads(info)["child-pid"])
        except (ValueError, KeyError, TypeError):
            raise SandboxError(f"bubblewrap reported no child pid on its --info-fd: {info[:200]!r}") from None
        net_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._ns_fds.append(net_fd)
        user_fd = fcntl.ioctl(net_fd, NS_GET_USERNS)
        os.set_inheritable(user_fd, False)
        self._ns_fds.append(user_fd)
        await asyncio.wait_for(self._configure(user_fd, net_fd), SETUP_TIMEOUT)
        try:
            os.write(self._block_w, b"1")
        except BrokenPipeError:  # nothing holds the block fd any more: the child that waited on it is gone
            return False
        return True

    async def _configure(self, user_fd: int, net_fd: int) -> None:
        if self.rule.mode == "internet":
            await self._inside(user_fd, net_fd, {"routes": prohibit_routes(self.policy)})
            await self._start_slirp(user_fd, net_fd)
            if extra := exception_routes(self.policy):
                await self._inside(user_fd, net_fd, {"routes": extra})
        if self.proxy is not None:
            await self.proxy.serve_socket(await self._listener_inside(user_fd, net_fd))

    async def _inside(self, user_fd: int, net_fd: int, job: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        """Run inside.py in the sandbox's namespaces with ``job``."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", str(INSIDE_HELPER), str(user_fd), str(net_fd),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            pass_fds=(user_fd, net_fd, *fds), env={},
        )  # fmt: skip
        out, _ = await proc.communicate(json.dumps(job).encode())
        if proc.returncode != 0:
            detail = out.decode(errors="replace").strip()[-300:]
            raise SandboxError(f"could not set up the sandbox's network: {detail}")

    async def _start_slirp(self, user_fd: int, net_fd: int) -> None:
        ready_r, ready_w = os.pipe()
        exit_r, self._slirp_exit_w = os.pipe()
        os.set_inheritable(self._slirp_exit_w, False)
        argv = [
            "slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback", "--enable-seccomp",
            f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", f"--userns-path=/proc/self/fd/{user_fd}",
            "--netns-type=path", f"/proc/self/fd/{net_fd}", "tap0",
        ]  # fmt: skip
        if os.geteuid() == 0:
            argv.insert(1, "--enable-sandbox")  # its own mount namespace, no capabilities; needs a mapped root
        try:
            self._slirp = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                pass_fds=(ready_w, exit_r, user_fd, net_fd), start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(ready_w)
            os.close(exit_r)
        try:
            ready = await asyncio.to_thread(_read_all, ready_r, 1)
        finally:
            os.close(ready_r)
        if ready != b"1":
            assert self._slirp.stderr is not None
            err = b""
            with contextlib.suppress(TimeoutError):
                err = await asyncio.wait_for(self._slirp.stderr.read(2000), 2)
            raise SandboxError(f"slirp4netns did not start: {err.decode(errors='replace').strip()[-300:]}")

    async def _listener_inside(self, user_fd: int, net_fd: int) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            job = {"listen": PROXY_PORT, "socket_fd": theirs.fileno()}
            await self._inside(user_fd, net_fd, job, fds=(theirs.fileno(),))
            theirs.close()
            ours.settimeout(5)  # the helper exited after sending: the socket is already waiting to be read
            _, fds, _, _ = socket.recv_fds(ours, 16, 1)
            if not fds:
                raise SandboxError("the network helper passed no listening socket")
            return socket.socket(fileno=fds[0])
        finally:
            theirs.close()
            ours.close()

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
        if self._slirp is not None and self._slirp.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._slirp.kill()
            await self._slirp.wait()
        for name in ("_info_r", "_block_w", "_info_w", "_block_r", "_slirp_exit_w"):
            self._close_fd(name)
        for fd in self._ns_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ns_fds.clear()


def _read_all(fd: int, limit: int = 65536) -> bytes:
    data = b""
    while len(data) < limit and (chunk := os.read(fd, limit - len(data))):
        data += chunk
    return data
