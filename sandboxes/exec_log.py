"""The full output of one sandbox command, kept on the worker's disk until the activity stores or discards it.

A command's output is sandbox-controlled and may echo a secret it was given. The log is created 0600 (only the
worker's user can read it), secrets are masked before a byte reaches the disk - streaming, holding back the few
bytes that could be the start of a secret split across two reads - and it stops growing at `LOG_LIMIT`, so a
command that prints forever cannot fill the worker's disk. Providers (bubblewrap.py, remote.py) write it; the
activities layer passes the mask (activities/secrets.py's `Redactor` fits `OutputMask`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

LOG_LIMIT = 1 << 30  # bytes of a command's output kept on disk; the rest is counted, not kept


class OutputMask(Protocol):
    """Masks secrets in a block of output. ``overlap``: how many trailing bytes could be a secret's start."""

    overlap: int

    def bytes(self, data: bytes) -> bytes: ...


class ExecLog:
    def __init__(self, path: Path, mask: OutputMask | None = None, limit: int = LOG_LIMIT) -> None:
        self.path = path
        self._mask = mask
        self._limit = limit
        self._written = 0
        self._pending = b""
        self._truncated = False
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        if self._truncated:
            return
        if self._mask is None:
            self._put(chunk)
            return
        data = self._mask.bytes(self._pending + chunk)
        keep = min(self._mask.overlap, len(data))
        self._pending = data[len(data) - keep :]
        self._put(data[: len(data) - keep])

    def _put(self, data: bytes) -> None:
        room = self._limit - self._written
        if len(data) > room:
            data = data[:room]
            self._truncated = True
        self._file.write(data)
        self._written += len(data)
        if self._truncated:
            self._file.write(f"\n[output past {self._limit:,} bytes was not kept]\n".encode())

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            if self._pending and not self._truncated:
                self._put(self._pending)  # already masked: it was held back only in case a secret continued
            self._pending = b""
        finally:
            self._file.close()
