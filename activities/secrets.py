"""Secrets by name: resolved from the worker's environment when an activity runs, and scrubbed from output.

A plain secret's value reaches the sandbox's environment and nothing else; a brokered secret's value (``{name,
hosts}``) does not even reach that: the sandbox gets a placeholder and the worker's egress proxy adds the value to
requests for its hosts (`Sandbox.broker_secrets`, sandboxes/network/broker.py). Output tails, stored logs and error
messages pass through a `Redactor` of the real values (never the placeholders) before they can reach history.
Bounded excerpts (a step's tail, the head and tail of a tool's output, the start of a file) come from
`Redactor.head` and `Redactor.tail`, which mask on the raw bytes first and cut after, so a secret that straddles
the cut is masked whole instead of leaving its unmasked end inside the excerpt.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from temporalio.exceptions import ApplicationError

from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.manifest import SecretForHosts, secret_name
from tardigrade.sandboxes.network.broker import HostSecret
from tardigrade.sandboxes.provider import Sandbox

MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary text everywhere; they are still never logged


@dataclass(frozen=True)
class ResolvedSecrets:
    """The Manifest's secrets with their values, read on the worker: ``plain`` go into the sandbox's environment,
    ``brokered`` stay on the worker (the sandbox gets placeholders). ``values`` are what a `Redactor` masks."""

    plain: dict[str, str]
    brokered: tuple[HostSecret, ...] = ()

    @property
    def values(self) -> list[str]:
        return [*self.plain.values(), *(b.value for b in self.brokered)]

    async def env_for(self, sandbox: Sandbox) -> dict[str, str]:
        """The secret variables of a command in ``sandbox``: plain values, and for brokered secrets their
        placeholders (plus the CA bundle variables), once the sandbox's proxy is set to add the real values."""
        env = dict(self.plain)
        if self.brokered:
            try:
                env |= await sandbox.broker_secrets(self.brokered)
            except SandboxError as e:
                raise ApplicationError(str(e), type="SecretBrokeringUnavailable", non_retryable=True) from None
        return env


def resolve_secrets(entries: Iterable[str | SecretForHosts]) -> ResolvedSecrets:
    plain: dict[str, str] = {}
    brokered: list[HostSecret] = []
    for entry in entries:
        name = secret_name(entry)
        value = _read(name)
        if isinstance(entry, SecretForHosts):
            brokered.append(HostSecret(name, value, tuple(entry.hosts)))
        else:
            plain[name] = value
    return ResolvedSecrets(plain, tuple(brokered))


def _read(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ApplicationError(
            f"secret {name} is not set on this worker; export {name} in the environment of the worker process"
            " (secrets are read from the worker, never from the pipeline or the workflow input)",
            type="SecretMissing",
            non_retryable=True,
        )
    return value


class Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._values = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        self._bytes = [v.encode() for v in self._values]
        self.overlap = max((len(b) for b in self._bytes), default=1) - 1

    def text(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, MASK)
        return text

    def bytes(self, data: bytes) -> bytes:
        for value in self._bytes:
            data = data.replace(value, MASK.encode())
        return data

    def head(self, data: builtins.bytes, limit: int, *, whole: bool) -> builtins.bytes:
        """The first ``limit`` bytes of a stream, masked. ``data`` is the stream's start - ideally ``limit`` +
        `overlap` bytes of it, so a secret crossing the cut is seen whole - or all of it when ``whole``."""
        return self._excerpt(data, 0, min(limit, len(data)), cut_start=False, cut_end=not whole)

    def tail(self, data: builtins.bytes, limit: int, *, whole: bool) -> builtins.bytes:
        """The last ``limit`` bytes of a stream, masked. ``data`` is the stream's end - ideally ``limit`` +
        `overlap` bytes of it - or all of it when ``whole``."""
        return self._excerpt(data, max(0, len(data) - limit), len(data), cut_start=not whole, cut_end=False)

    def _excerpt(self, data: builtins.bytes, start: int, end: int, *, cut_start: bool, cut_end: bool) -> builtins.bytes:
        """``data[start:end]`` with every secret masked, positions taken on the raw bytes: a secret that crosses
        ``start`` or ``end`` becomes one mask. Where ``data`` itself was cut out of a longer stream (``cut_start``,
        ``cut_end``), its edge may hold part of a secret that cannot be matched whole: an edge that reads like the
        end (or start) of a secret is masked too."""
        spans = [(i, i + len(v)) for v in self._bytes for i in _find_all(data, v)]
        for k in range(min(self.overlap, len(data)), 0, -1):
            if cut_start and any(v.endswith(data[:k]) for v in self._bytes):
                spans.append((0, k))
                break
        for k in range(min(self.overlap, len(data)), 0, -1):
            if cut_end and any(v.startswith(data[-k:]) for v in self._bytes):
                spans.append((len(data) - k, len(data)))
                break
        out = bytearray()
        at = start
        for span_start, span_end in _merged(spans):
            if span_end <= start or span_start >= end:
                continue
            out += data[at:span_start] if span_start > at else b""
            out += MASK.encode()
            at = max(at, span_end)
        out += data[at:end] if at < end else b""
        return builtins.bytes(out)

    def copy(self, src: Path, dst: IO[builtins.bytes], block: int = 1 << 20) -> None:
        """Stream a file through the redactor, keeping an overlap so a secret split across blocks is caught."""
        with open(src, "rb") as f:
            pending = b""
            while chunk := f.read(block):
                data = self.bytes(pending + chunk)
                keep = min(self.overlap, len(data))
                dst.write(data[: len(data) - keep])
                pending = data[len(data) - keep :]
            dst.write(self.bytes(pending))


def _find_all(data: bytes, value: bytes) -> list[int]:
    """Every position of ``value`` in ``data``, overlapping ones included."""
    found, at = [], data.find(value)
    while at != -1:
        found.append(at)
        at = data.find(value, at + 1)
    return found


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
