"""Secrets by name: resolved from the worker's environment when an activity runs, and scrubbed from output.

A secret's value reaches the sandbox's environment and nothing else: output tails, stored logs and error
messages pass through a `Redactor` before they can reach workflow history.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from temporalio.exceptions import ApplicationError

MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary text everywhere; they are still never logged


def resolve_secrets(names: Iterable[str]) -> dict[str, str]:
    values = {}
    for name in names:
        value = os.environ.get(name)
        if value is None:
            raise ApplicationError(
                f"secret {name} is not set on this worker; export {name} in the environment of the worker process"
                " (secrets are read from the worker, never from the pipeline or the workflow input)",
                type="SecretMissing",
                non_retryable=True,
            )
        values[name] = value
    return values


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
