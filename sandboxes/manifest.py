"""The Manifest: a portable description of what a sandbox needs, whichever provider runs it.

Files and folders to place in the workspace, environment variables, secrets (by name only: values are read from
the worker's environment when an activity runs), data mounts (buckets and folders the worker copies in with its
own credentials), setup commands (dependencies; run at provisioning and again after every rehydration) and which
paths a snapshot covers. Mounted paths are never part of a snapshot: they are copied in again on rehydration.

Every sandbox has the same layout so that snapshots and venvs move between providers unchanged: the workspace
is ``/workspace`` (relative paths in a Manifest are relative to it) and the home folder is ``/home/sandbox``.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from tardigrade.sandboxes.layout import HOME, RESERVED_ENV, WORKSPACE, WRITABLE_ROOTS
from tardigrade.sandboxes.network.rules import check_host_pattern
from tardigrade.sandboxes.selection import Selection

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_ENV = RESERVED_ENV


def _absolute(path: str) -> str:
    """``~`` is the home folder, a relative path is inside the workspace; the result is normalized."""
    if path == "~" or path.startswith("~/"):
        path = HOME + path[1:]
    elif not path.startswith("/"):
        path = f"{WORKSPACE}/{path}"
    return posixpath.normpath(path)


def sandbox_path(path: str, *, field: str = "path") -> str:
    """Normalize a path as a sandbox sees it: relative paths are inside the workspace, ``~`` is the home folder.
    Only paths inside the workspace or home may be written."""
    if not path or not path.strip():
        raise ValueError(f"{field} is empty")
    original, normalized = path, _absolute(path)
    if not any(normalized == root or normalized.startswith(root + "/") for root in WRITABLE_ROOTS):
        raise ValueError(f"{field} {original!r} is outside the sandbox's writable areas ({WORKSPACE} and {HOME})")
    return normalized


def tree_path(sandbox_abs_path: str) -> str:
    """Snapshot trees mirror the sandbox's absolute paths without the leading slash."""
    return sandbox_abs_path.lstrip("/")


# What `sandbox_path` accepts, roughly, for the JSON Schema (tardigrade/schema.py): editors and other languages
# check the shape; this module still normalizes and checks every path (``a/../..`` is caught only here).
SANDBOX_PATH_SCHEMA: dict[str, Any] = {
    "pattern": r"^(?:/workspace(?:/.*)?|/home/sandbox(?:/.*)?|[^/].*)$",
    "errorMessage": f"must be inside {WORKSPACE} or ~ ({HOME}); relative paths are inside {WORKSPACE}",
}


# The seed (the Manifest's files and folders) is restored into an empty sandbox, so it covers all writable areas.
SEED_SELECTION = Selection(roots=tuple(tree_path(p) for p in WRITABLE_ROOTS))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManifestFile(_Strict):
    """A file placed in the sandbox before setup: inline ``content``, or ``source`` copied from the client's disk
    (relative to the pipeline file). Contents travel through the snapshot store, never through workflow history."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "oneOf": [{"required": ["content"]}, {"required": ["source"]}],
                    "errorMessage": "give exactly one of 'content' (inline text) or 'source' (a local file to copy)",
                }
            ]
        }
    )

    path: str = Field(
        description="Where the file goes; relative paths are inside /workspace.", json_schema_extra=SANDBOX_PATH_SCHEMA
    )
    content: str | None = Field(default=None, description="The file's text, inline.")
    source: str | None = Field(default=None, description="A local file to copy, relative to the pipeline file.")
    executable: bool = Field(default=False, description="Set the exec bits (mode 755).")

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

    include: list[str] = Field(
        default_factory=lambda: [WORKSPACE],
        description="Sandbox paths the snapshots cover (default: /workspace).",
        json_schema_extra={"minItems": 1, "items": {"type": "string", **SANDBOX_PATH_SCHEMA}},
    )
    exclude: list[str] = Field(
        default_factory=list, description="Globs left out: **/.cache anywhere, /workspace/tmp/** absolute, build/**."
    )

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


class SecretForHosts(_Strict):
    """A brokered secret: the sandbox's environment holds an opaque placeholder, never the value; the worker's
    egress proxy puts the value into the headers of HTTPS requests to ``hosts`` only (sandboxes/network/broker.py).
    A plain name in ``secrets`` is the weaker mode: its value is in the sandbox's environment."""

    name: SecretName = Field(description="The secret's name: the worker's environment variable holding its value.")
    hosts: list[str] = Field(
        min_length=1,
        description="Hosts whose HTTPS requests get the value (api.github.com, *.example.com); no other host does.",
    )

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        checked = [check_host_pattern(h, f"hosts[{i}]") for i, h in enumerate(v)]
        return list(dict.fromkeys(checked))


#: One entry of ``secrets``: a name (value in the sandbox's environment) or ``{name, hosts}`` (brokered).
SecretEntry = Annotated[
    Annotated[SecretName, Tag("name")] | Annotated[SecretForHosts, Tag("brokered")],
    # Errors name the form that was used: a mapping is a brokered secret, anything else should have been a name.
    Discriminator(lambda v: "brokered" if isinstance(v, dict | SecretForHosts) else "name"),
]


def secret_name(entry: str | SecretForHosts) -> str:
    return entry if isinstance(entry, str) else entry.name


MOUNT_FORMS = (
    "s3://bucket/prefix[?endpoint=URL&region=NAME], r2://ACCOUNT_ID/bucket/prefix, gs://bucket/prefix,"
    " az://container/prefix?account=NAME or file:///absolute/folder"
)


# The URL and name rules below, as far as JSON Schema can say them (see SANDBOX_PATH_SCHEMA).
def _anycase(word: str) -> str:
    """A regex for ``word`` in any case: JSON Schema patterns take no flags. A "-" stays as it is: its escape is
    an error in JavaScript's unicode-mode regexes (ajv, the TypeScript client)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c if c == "-" else re.escape(c) for c in word)


# No credential in the query (the key names `refuse_credentials` checks, roughly) or in an endpoint's user part.
_SCHEMA_CREDENTIAL_WORDS = ("token", "secret", "password", "credential", "signature", "access_key", "accesskey",
                            "apikey", "api_key", "sas")  # fmt: skip
_NO_CREDENTIAL_QUERY = (
    r"(?![^#]*[?&](?:"
    + "|".join(_anycase(k) + "=" for k in ("sig", "key", "pwd", "passwd", "awsaccesskeyid"))
    + "|"
    + _anycase("x-amz-")
    + "|[^=&#]*(?:"
    + "|".join(_anycase(k) for k in _SCHEMA_CREDENTIAL_WORDS)
    + ")[^=&#]*="
    + r"))(?![^#]*[?&]endpoint=[^&#]*(?:@|%40))"
)
#: For a store URL (which may also be a bare folder path): no credential in it.
NO_CREDENTIALS_SCHEMA: dict[str, Any] = {
    "pattern": r"^" + _NO_CREDENTIAL_QUERY + r"(?![a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*@)",
    "errorMessage": "must not carry credentials (user:password@, sig=, token=, ...); the worker has its own",
}
DATA_URL_SCHEMA: dict[str, Any] = {
    "pattern": r"^" + _NO_CREDENTIAL_QUERY + r"(?:(?:s3|r2|gs|az)://[^/@?#]+(?:[/?#]|$)|file://(?:localhost)?/)",
    "errorMessage": f"expected {MOUNT_FORMS}, with no credentials in it",
}
ENV_NAME_SCHEMA: dict[str, Any] = {
    "pattern": _ENV_NAME.pattern,
    "not": {"enum": sorted(_RESERVED_ENV)},
    "errorMessage": f"variable names are letters, digits and _; {', '.join(sorted(_RESERVED_ENV))} are set by the"
    " sandbox",
}

# Where a mount may not go: the system's own folders, and the roots of the writable areas themselves.
_SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/tmp",
                "/usr", "/var", "/root")  # fmt: skip


def mount_path(path: str) -> str:
    """Normalize where a mount appears in the sandbox: relative paths are inside the workspace; absolute paths may
    be anywhere but the system's folders (``/data``, ``/workspace/inputs``, ``~/datasets``)."""
    if not path or not path.strip():
        raise ValueError("path is empty")
    original, normalized = path, _absolute(path)
    if normalized in ("/", "//", *WRITABLE_ROOTS, "/home"):
        raise ValueError(f"path {original!r} would hide a whole folder; mount into a subfolder such as /workspace/data")
    if any(normalized == d or normalized.startswith(d + "/") for d in _SYSTEM_DIRS):
        raise ValueError(f"path {original!r} is a system folder; use e.g. /workspace/data, ~/datasets or /data")
    if any(c in normalized for c in "*?[\n\0"):
        raise ValueError(f"path {original!r} contains a glob character or a control character")
    return normalized


# Query keys that carry a credential (SAS signatures, presigned S3 URLs, tokens); compared lower-case.
_CREDENTIAL_KEYS = frozenset(
    {"sig", "sas", "token", "secret", "key", "password", "passwd", "pwd", "awsaccesskeyid", "access_key",
     "accesskey", "credential", "credentials", "signature"}
)  # fmt: skip
_CREDENTIAL_PARTS = ("token", "secret", "password", "credential", "signature", "access_key", "accesskey", "apikey",
                     "api_key", "sas")  # fmt: skip
_NO_CREDENTIALS = (
    "credentials never go in pipeline URLs (they would be written to workflow history); remove it and give the"
    " worker its credentials the usual way (its environment, e.g. AWS_* or AZURE_STORAGE_SAS_TOKEN, a profile or"
    " a role)"
)


def _credential_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in _CREDENTIAL_KEYS or lowered.startswith("x-amz-") or any(p in lowered for p in _CREDENTIAL_PARTS)


def refuse_credentials(v: str, field: str) -> None:
    """Raise ValueError if a URL carries a credential: a ``user:password@`` part, or a query key such as ``sig``,
    ``token`` or ``X-Amz-Signature`` (also inside an ``endpoint=`` value). Never echoes the credential."""
    try:
        parts = urlsplit(v)
        query = parse_qs(parts.query, keep_blank_values=True)
    except ValueError:
        return  # not a URL: the scheme checks say so
    if "@" in parts.netloc:
        raise ValueError(f"{field} has a user/password part; {_NO_CREDENTIALS}")
    for key, values in query.items():
        if _credential_key(key):
            raise ValueError(f"{field} carries a credential (query parameter {key!r}); {_NO_CREDENTIALS}")
        if key.lower() == "endpoint":
            for value in values:
                refuse_credentials(value, f"{field} (its endpoint)")


def check_data_url(v: str, field: str) -> str:
    """A bucket or folder URL as mounts and outputs take it: a known scheme, a bucket, no credentials in it."""
    refuse_credentials(v, field)  # first: the messages below show the URL
    # As shown in messages: no query, and no user/password part even where urlsplit finds no netloc (``s 3://u:p@b``).
    bare = re.sub(r"^([^/?#]*://)[^/?#]*@", r"\1", v.split("?")[0])
    try:
        parts = urlsplit(v)
    except ValueError:
        raise ValueError(f"{field} {bare!r} is not a URL; use {MOUNT_FORMS}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("s3", "r2", "gs", "az", "file"):
        shown = f"unknown scheme {scheme!r}" if scheme else "no scheme"
        raise ValueError(f"{field} {bare!r} has {shown}; use {MOUNT_FORMS}")
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"{field} {bare!r}: file:// URLs take an absolute path, e.g. file:///srv/datasets")
    elif not parts.netloc or (scheme == "r2" and not parts.path.strip("/")):
        what = "container" if scheme == "az" else "bucket"
        raise ValueError(f"{field} {bare!r} names no {what}; use {MOUNT_FORMS}")
    return v


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


class Mount(_Strict):
    """Data the worker copies into the sandbox before setup, with the worker's own credentials: none of them enters
    the sandbox. ``ro`` (the default) is enforced by the sandbox (a read-only bind, or root-owned read-only files).
    ``include``/``exclude`` are globs on object names relative to the source prefix (``*.csv``, ``2024/**``).
    A mount is not part of any snapshot: it is copied in again (skipping unchanged objects) on rollback and
    rehydration, so a step's writes into an ``rw`` mount do not survive a retry - write results elsewhere."""

    source: str = Field(description=f"The bucket or folder: {MOUNT_FORMS}.", json_schema_extra=DATA_URL_SCHEMA)
    path: str = Field(description="Where it appears in the sandbox; relative paths are inside /workspace.")
    mode: Literal["ro", "rw"] = Field(default="ro", description="ro (read-only, the default) or rw.")
    include: list[str] = Field(default_factory=list, description="Globs on object names, e.g. *.csv.")
    exclude: list[str] = Field(default_factory=list, description="Globs on object names left out.")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return check_data_url(v, "source")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return mount_path(v)

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not pattern.strip() or pattern.startswith("/"):
                raise ValueError(f"glob {pattern!r} must be a non-empty pattern relative to the source, e.g. '*.csv'")
        return v

    @property
    def read_only(self) -> bool:
        return self.mode == "ro"


class Manifest(_Strict):
    """What a sandbox needs, whichever provider runs it: files, folders, environment, secrets (by name), data
    mounts, setup commands, and which paths snapshots cover."""

    files: list[ManifestFile] = Field(
        default_factory=list, description="Files placed in the sandbox before setup: inline or copied from disk."
    )
    directories: list[str] = Field(
        default_factory=list,
        description="Folders to create; relative paths are inside /workspace, ~/ is /home/sandbox.",
        json_schema_extra={"items": {"type": "string", **SANDBOX_PATH_SCHEMA}},
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables of every command.",
        json_schema_extra={"propertyNames": ENV_NAME_SCHEMA},
    )
    secrets: list[SecretEntry] = Field(
        default_factory=list,
        description="Secrets, read from the worker's environment: a name (its value goes into the sandbox's"
        " environment) or {name, hosts} (brokered: the sandbox sees a placeholder; the worker adds the value to"
        " HTTPS request headers for those hosts only).",
    )
    setup: list[str] = Field(
        default_factory=list, description="Commands run at provisioning, and again after every rehydration."
    )
    mounts: list[Mount] = Field(
        default_factory=list, description="Buckets and folders the worker copies in, with its own credentials."
    )
    snapshot: SnapshotPaths = Field(default_factory=SnapshotPaths, description="Which paths snapshots cover.")

    @property
    def secret_names(self) -> list[str]:
        return [secret_name(s) for s in self.secrets]

    @property
    def brokered_secrets(self) -> list[SecretForHosts]:
        return [s for s in self.secrets if isinstance(s, SecretForHosts)]

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
        names = [secret_name(s) for s in self.secrets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"secrets: {twice} listed more than once; list each secret once")
        clash = set(self.env) & set(names)
        if clash:
            raise ValueError(f"{sorted(clash)} appear in both env and secrets; a secret's value comes from the worker")
        paths = [f.path for f in self.files]
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        if dupes:
            raise ValueError(f"files: {dupes} listed more than once")
        self._check_mounts()
        return self

    def _check_mounts(self) -> None:
        """Mounts may not overlap each other, the Manifest's files or a snapshot root; they are left out of every
        snapshot (added to ``snapshot.exclude``), so mounted data never reaches the snapshot store."""
        mounts = [m.path for m in self.mounts]
        for i, a in enumerate(mounts):
            for j, b in enumerate(mounts):
                if i < j and (_inside(a, b) or _inside(b, a)):
                    raise ValueError(f"mounts[{i}] ({a}) and mounts[{j}] ({b}) overlap; give each its own folder")
            for root in self.snapshot.include:
                if _inside(root, a):
                    raise ValueError(
                        f"mounts[{i}] ({a}) contains snapshot root {root}; mounted data is never snapshotted"
                    )
            for f in (*(f.path for f in self.files), *self.directories):
                if _inside(f, a):
                    raise ValueError(f"mounts[{i}] ({a}) would hide {f} from the Manifest's files and directories")
        wanted = [p for m in mounts for p in (m, f"{m}/**")]
        missing = [p for p in wanted if p not in self.snapshot.exclude]
        if missing:
            # The model is frozen and validated; the normalized exclusions need no second validation.
            snapshot = self.snapshot.model_copy(update={"exclude": [*self.snapshot.exclude, *missing]})
            object.__setattr__(self, "snapshot", snapshot)


IsolationLevel = Literal["required", "preferred"]


# Outputs belong to the pipeline, not the Manifest, but share its path and URL rules. Publishing them is in
# sandboxes/outputs.py; this is the pure declaration the workflow may import.
PLACEHOLDERS = ("run", "step", "pipeline")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class Output(BaseModel):
    """A sandbox path (a file or a folder) published to an object-store prefix after a step or at the end."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        description="A sandbox path (file or folder) in the snapshots.", json_schema_extra=SANDBOX_PATH_SCHEMA
    )
    to: str = Field(
        description="An object-store prefix; may contain {run}, {step} and {pipeline}.",
        json_schema_extra=DATA_URL_SCHEMA,
    )
    after: str = Field(
        default="end", description="end (the default), each_step (every checkpoint), or the name of a step."
    )
    include: list[str] = Field(default_factory=list, description="Globs of files to publish.")
    exclude: list[str] = Field(default_factory=list, description="Globs of files left out.")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return sandbox_path(v)

    @field_validator("to")
    @classmethod
    def _to(cls, v: str) -> str:
        for name in _PLACEHOLDER.findall(v):
            if name not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise ValueError(f"unknown placeholder {{{name}}}; use {known}")
        return check_data_url(v, "to")

    def destination(self, *, run: str, step: int | None, pipeline: str) -> str:
        """The URL with its placeholders filled in (``{step}`` is 1-based, or ``end``)."""
        values = {"run": run, "step": "end" if step is None else str(step + 1), "pipeline": pipeline}
        return _PLACEHOLDER.sub(lambda m: _safe_segment(values[m.group(1)]), self.to)

    def applies_after(self, step_name: str | None) -> bool:
        """Whether this output is published after the checkpoint of ``step_name`` (None: the end of the run)."""
        if step_name is None:
            return self.after == "end"
        return self.after == "each_step" or self.after == step_name


def _safe_segment(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", value)
