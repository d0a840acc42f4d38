"""The Manifest: a portable description of what a sandbox needs, whichever provider runs it.

Files and folders to place in the workspace, environment variables, secrets (by name only: values are read from
the worker's environment when an activity runs), setup commands (dependencies; run at provisioning and again
after every rehydration) and which paths a snapshot covers.

Every sandbox has the same layout so that snapshots and venvs move between providers unchanged: the workspace
is ``/workspace`` (relative paths in a Manifest are relative to it) and the home folder is ``/home/sandbox``.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sandboxes.snapshots.selection import Selection

WORKSPACE = "/workspace"
HOME = "/home/sandbox"
WRITABLE_ROOTS = (WORKSPACE, HOME)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_ENV = {"HOME", "PATH", "USER", "PWD", "TMPDIR"}


def sandbox_path(path: str, *, field: str = "path") -> str:
    """Normalize a path as a sandbox sees it: relative paths are inside the workspace, ``~`` is the home folder.
    Only paths inside the workspace or home may be written."""
    if not path or not path.strip():
        raise ValueError(f"{field} is empty")
    original = path
    if path == "~" or path.startswith("~/"):
        path = HOME + path[1:]
    elif not path.startswith("/"):
        path = f"{WORKSPACE}/{path}"
    normalized = posixpath.normpath(path)
    if not any(normalized == root or normalized.startswith(root + "/") for root in WRITABLE_ROOTS):
        raise ValueError(f"{field} {original!r} is outside the sandbox's writable areas ({WORKSPACE} and {HOME})")
    return normalized


def tree_path(sandbox_abs_path: str) -> str:
    """Snapshot trees mirror the sandbox's absolute paths without the leading slash."""
    return sandbox_abs_path.lstrip("/")


# The seed (the Manifest's files and folders) is restored into an empty sandbox, so it covers all writable areas.
SEED_SELECTION = Selection(roots=tuple(tree_path(p) for p in WRITABLE_ROOTS))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManifestFile(_Strict):
    """A file placed in the sandbox before setup: inline ``content``, or ``source`` copied from the client's disk
    (relative to the pipeline file). Contents travel through the snapshot store, never through workflow history."""

    path: str
    content: str | None = None
    source: str | None = None
    executable: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return sandbox_path(v)

    @model_validator(mode="after")
    def _one_source(self) -> ManifestFile:
        if (self.content is None) == (self.source is None):
            raise ValueError("give exactly one of 'content' (inline text) or 'source' (a local file to copy)")
        return self


class SnapshotPaths(_Strict):
    """What a snapshot covers. ``include`` are sandbox paths (``~/.local``, ``/workspace``); ``exclude`` are
    globs: ``**/.cache`` anywhere, ``/workspace/tmp/**`` absolute, ``build/**`` relative to the workspace."""

    include: list[str] = Field(default_factory=lambda: [WORKSPACE])
    exclude: list[str] = Field(default_factory=list)

    @field_validator("include")
    @classmethod
    def _include(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("include must name at least one path, e.g. /workspace")
        return [sandbox_path(p, field="include path") for p in v]

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v: list[str]) -> list[str]:
        out = []
        for pattern in v:
            if not pattern.strip():
                raise ValueError("exclude patterns must not be empty")
            if pattern.startswith("~/"):
                pattern = HOME + pattern[1:]
            elif not pattern.startswith(("/", "**")):
                pattern = f"{WORKSPACE}/{pattern}"
            out.append(pattern)
        return out

    def selection(self, extra_excludes: tuple[str, ...] = ()) -> Selection:
        return Selection(
            roots=tuple(tree_path(p) for p in self.include),
            excludes=tuple(p.lstrip("/") for p in (*self.exclude, *extra_excludes)),
        )


SecretName = Annotated[str, Field(pattern=_ENV_NAME.pattern)]


class Manifest(_Strict):
    files: list[ManifestFile] = Field(default_factory=list)
    directories: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    secrets: list[SecretName] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)
    snapshot: SnapshotPaths = Field(default_factory=SnapshotPaths)

    @field_validator("directories")
    @classmethod
    def _dirs(cls, v: list[str]) -> list[str]:
        return [sandbox_path(p, field="directory") for p in v]

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not valid (letters, digits, underscore)")
            if name in _RESERVED_ENV:
                raise ValueError(f"environment variable {name} is set by the sandbox and cannot be overridden")
        return v

    @model_validator(mode="after")
    def _no_clashes(self) -> Manifest:
        clash = set(self.env) & set(self.secrets)
        if clash:
            raise ValueError(f"{sorted(clash)} appear in both env and secrets; a secret's value comes from the worker")
        paths = [f.path for f in self.files]
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        if dupes:
            raise ValueError(f"files: {dupes} listed more than once")
        return self


IsolationLevel = Literal["required", "preferred"]
