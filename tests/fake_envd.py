"""The agent inside a fake cloud sandbox (tests/provider_fakes.py): a stand-in for E2B's envd or Modal's worker.

It runs as pid 1's child in a bubblewrap "machine" (its own root filesystem, pid, ipc, uts and optionally net
namespaces) as root, and serves one request per connection on a Unix socket: start a process as some uid and
stream its stdout/stderr, kill a process group, list processes, read or write a file as some uid. Processes share
the machine's pid namespace and outlive the connection that started them, as in a real VM or container; only the
RPC layer between the SDK objects and the machine is simplified. Stdlib only: it runs on the host's python3.

Wire format: the request is one JSON line; every answer is frames of a type byte, a 4-byte big-endian length
and a payload. P: the started pid (JSON), O/E: stdout/stderr bytes, X: the final status (JSON).
Writes send D frames (data) and one Z frame (end of data) after the request line.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

_running: dict[int, subprocess.Popen[bytes]] = {}
_lock = threading.Lock()


def send(conn: socket.socket, kind: bytes, payload: bytes) -> bool:
    try:
        conn.sendall(kind + struct.pack(">I", len(payload)) + payload)
        return True
    except OSError:
        return False  # the client went away; the process keeps running, as with a real envd


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client closed the connection")
        data += chunk
    return bytes(data)


def as_user(uid: int | None) -> dict[str, Any]:
    if uid is None or uid == 0:
        return {}
    return {"user": uid, "group": uid, "extra_groups": []}


def pump(conn: socket.socket, proc: subprocess.Popen[bytes]) -> bool:
    """Forward stdout/stderr until both close. Returns whether the client is still there."""
    connected = True
    selector = selectors.DefaultSelector()
    assert proc.stdout is not None
    selector.register(proc.stdout, selectors.EVENT_READ, b"O")
    if proc.stderr is not None:
        selector.register(proc.stderr, selectors.EVENT_READ, b"E")
    while selector.get_map():
        for key, _ in selector.select():
            data = os.read(key.fd, 65536)
            if not data:
                selector.unregister(key.fileobj)
                continue
            if connected:
                connected = send(conn, key.data, data)
    return connected


def run_exec(conn: socket.socket, request: dict[str, Any]) -> None:
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", request["cmd"]],
            env=request.get("env") or {},
            cwd=request.get("cwd") or "/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            **as_user(request.get("uid")),
        )
    except OSError as e:
        send(conn, b"X", json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        return
    with _lock:
        _running[proc.pid] = proc
    send(conn, b"P", json.dumps({"pid": proc.pid}).encode())
    try:
        pump(conn, proc)
        code = proc.wait()
    finally:
        with _lock:
            _running.pop(proc.pid, None)
    status = {"code": code if code >= 0 else 128 - code, "signal": -code if code < 0 else None}
    send(conn, b"X", json.dumps(status).encode())


def run_file_op(conn: socket.socket, request: dict[str, Any]) -> None:
    path = request["path"]
    if request["op"] == "read":
        argv = ["cat", "--", path]
        stdin = subprocess.DEVNULL
    else:
        argv = ["/bin/sh", "-c", 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"', "sh", path]
        stdin = subprocess.PIPE
    proc = subprocess.Popen(
        argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", **as_user(request.get("uid"))
    )
    errors = bytearray()
    if request["op"] == "write":
        assert proc.stdin is not None
        while True:
            kind = recv_exact(conn, 1)
            (length,) = struct.unpack(">I", recv_exact(conn, 4))
            data = recv_exact(conn, length)
            if kind == b"Z":
                break
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(data)
        proc.stdin.close()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read()
        errors += proc.stderr.read()
    else:
        assert proc.stdout is not None and proc.stderr is not None
        while chunk := proc.stdout.read(65536):
            send(conn, b"O", chunk)
        errors += proc.stderr.read()
    code = proc.wait()
    send(conn, b"X", json.dumps({"code": code, "stderr": errors.decode(errors="replace")[-500:]}).encode())


def serve(conn: socket.socket) -> None:
    with conn:
        line = bytearray()
        while not line.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                return
            line += chunk
        request = json.loads(line)
        op = request["op"]
        if op == "exec":
            run_exec(conn, request)
        elif op in ("read", "write"):
            run_file_op(conn, request)
        elif op == "kill":
            try:
                os.killpg(int(request["pid"]), signal.SIGKILL)
                ok = True
            except ProcessLookupError:
                ok = False
            send(conn, b"X", json.dumps({"ok": ok}).encode())
        elif op == "list":
            with _lock:
                pids = [pid for pid, proc in _running.items() if proc.poll() is None]
            send(conn, b"X", json.dumps({"pids": pids}).encode())
        elif op == "ping":
            send(conn, b"X", b"{}")


def main() -> None:
    path = sys.argv[1]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
