"""`tardigrade codec-server`: decrypt encrypted history for the Temporal Web UI and the `temporal` CLI.

    tardigrade codec-server [--host 127.0.0.1] [--port 8081] [--origin URL ...] [--namespace NS ...]

Temporal's codec-server protocol: POST .../decode and .../encode take and return ``{"payloads": [...]}``
(`Payloads` in protobuf's JSON form); only the last part of the path counts, so it can sit behind any prefix.
The Web UI calls it from the operator's browser, so it answers CORS preflights (OPTIONS) for the UI's origins only
(default: the dev server's UI, http://localhost:8233). With ``TARDIGRADE_CODEC_SERVER_TOKEN`` set, every
/encode and /decode must carry ``Authorization: Bearer <token>`` (`temporal --codec-auth "Bearer ..."`; the Web UI
can pass its user's access token). The keys come from TARDIGRADE_CODEC_KEY or TARDIGRADE_CODEC_KEY_FILE, as on the
workers; whoever reaches this server can read history, so keep it on loopback or behind auth.

Standard library only (http.server): a bare install runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from tardigrade.cli.output import UsageError
from tardigrade.codec import CodecError, CodecKeys, EncryptionCodec

ENV_TOKEN = "TARDIGRADE_CODEC_SERVER_TOKEN"
DEFAULT_PORT = 8081
#: The dev server's Web UI (`temporal server start-dev`, `tardigrade server`), under both loopback names.
DEFAULT_ORIGINS = ("http://localhost:8233", "http://127.0.0.1:8233")
#: Larger bodies are refused before they are read: history payloads are at most a few MiB each.
MAX_BODY = 16 << 20

log = logging.getLogger("tardigrade.codec_server")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("codec-server", help="decrypt encrypted history for the Temporal Web UI and `temporal` CLI")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default %(default)s)")
    p.add_argument(
        "--origin",
        action="append",
        help="a Web UI origin allowed to call it from a browser (repeatable; default: http://localhost:8233 and"
        " http://127.0.0.1:8233)",
    )
    p.add_argument("--namespace", action="append", help="serve only these namespaces (X-Namespace; default: any)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
    p.set_defaults(handler=cmd_codec_server)


class CodecServer(ThreadingHTTPServer):
    """The HTTP server; the handler reads its settings from here."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        codec: EncryptionCodec,
        *,
        origins: Sequence[str] = DEFAULT_ORIGINS,
        token: str | None = None,
        namespaces: Sequence[str] = (),
    ) -> None:
        self.codec = codec
        self.origins = frozenset(o.rstrip("/") for o in origins)
        self.token = token
        self.namespaces = frozenset(namespaces)
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: CodecServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)  # the request line and status, never a payload

    # -- CORS ---------------------------------------------------------------------------------------------------

    def _origin(self) -> str | None:
        """The request's Origin if it is allowed, "" if there is none (the CLI), None if it is not allowed."""
        origin = self.headers.get("Origin")
        if origin is None:
            return ""
        return origin if origin.rstrip("/") in self.server.origins else None

    def _reply(
        self, status: HTTPStatus, body: bytes = b"", *, origin: str = "", extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Allow-Credentials", "true")
            self.send_header("Vary", "Origin")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json" if body.startswith(b"{") else "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status: HTTPStatus, message: str, origin: str = "") -> None:
        # The request's body may be unread: close the connection rather than parse it as the next request.
        self.close_connection = True
        self._reply(status, json.dumps({"error": message}).encode(), origin=origin, extra={"Connection": "close"})

    def do_OPTIONS(self) -> None:
        origin = self._origin()
        if not origin:
            self._refuse(HTTPStatus.FORBIDDEN, "origin not allowed; start the codec server with --origin for it")
            return
        self._reply(
            HTTPStatus.OK,
            origin=origin,
            extra={
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type, X-Namespace, Authorization",
                "Access-Control-Max-Age": "600",
            },
        )

    # -- encode / decode ----------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "POST payloads to /encode or /decode")

    def do_POST(self) -> None:
        origin = self._origin()
        if origin is None:
            self._refuse(HTTPStatus.FORBIDDEN, "origin not allowed; start the codec server with --origin for it")
            return
        action = self.path.split("?", 1)[0].rstrip("/").rpartition("/")[2]
        if action not in ("encode", "decode"):
            self._refuse(HTTPStatus.NOT_FOUND, "POST to .../encode or .../decode", origin)
            return
        if self.server.token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode()):
                self._refuse(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token", origin)
                return
        namespace = self.headers.get("X-Namespace", "")
        if self.server.namespaces and namespace not in self.server.namespaces:
            self._refuse(HTTPStatus.FORBIDDEN, f"namespace {namespace!r} is not served here", origin)
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required", origin)
            return
        if not 0 <= length <= MAX_BODY:
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"at most {MAX_BODY} bytes per request", origin)
            return
        try:
            payloads = json_format.Parse(self.rfile.read(length), Payloads())
            codec = self.server.codec
            convert = codec.encrypt if action == "encode" else codec.decrypt
            out = Payloads(payloads=[convert(p) for p in payloads.payloads])
        except json_format.ParseError as e:
            self._refuse(HTTPStatus.BAD_REQUEST, f"not a Payloads JSON object: {str(e)[:200]}", origin)
            return
        except CodecError as e:
            self._refuse(HTTPStatus.BAD_REQUEST, str(e), origin)
            return
        self._reply(HTTPStatus.OK, json_format.MessageToJson(out, indent=None).encode(), origin=origin)


def build_server(
    host: str,
    port: int,
    *,
    keys: CodecKeys | None = None,
    origins: Sequence[str] | None = None,
    token: str | None = None,
    namespaces: Sequence[str] = (),
) -> CodecServer:
    """A codec server (not yet serving) for ``keys`` (default: the environment's, as on the workers)."""
    keys = keys or CodecKeys.from_env()
    if keys is None:
        raise UsageError(
            "the codec server needs the workers' key: set TARDIGRADE_CODEC_KEY or TARDIGRADE_CODEC_KEY_FILE"
        )
    for origin in origins or ():
        if not origin.startswith(("http://", "https://")) or origin.rstrip("/").count("/") != 2:
            raise UsageError(
                f"--origin {origin}: give the UI's origin as scheme://host[:port], e.g. {DEFAULT_ORIGINS[0]}"
            )
    try:
        return CodecServer(
            (host, port), EncryptionCodec(keys), origins=origins or DEFAULT_ORIGINS, token=token, namespaces=namespaces
        )
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None


async def cmd_codec_server(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get(ENV_TOKEN) or None
    server = build_server(args.host, args.port, origins=args.origin, token=token, namespaces=args.namespace or ())
    thread = threading.Thread(target=server.serve_forever, name="codec-server", daemon=True)
    thread.start()
    auth = f"bearer token from ${ENV_TOKEN}" if token else f"no auth (set ${ENV_TOKEN} to require a bearer token)"
    print(
        f"codec server on {server.url} (keys {', '.join(server.codec.keys.ids)}; origins"
        f" {', '.join(sorted(server.origins))}; {auth})\n"
        f"Web UI: its codec server setting (data-encoder icon) = {server.url}, or `tardigrade server --codec-endpoint"
        f" {server.url}`; CLI: `temporal workflow show -w ID --codec-endpoint {server.url}`",
        flush=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.to_thread(server.shutdown)
    server.server_close()
    return 0
