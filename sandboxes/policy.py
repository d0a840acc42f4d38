"""The worker policy: what a pipeline may make a worker read, write, connect to or run on.

The worker operator is trusted; a pipeline author only as far as this policy says. Every host path and endpoint a
pipeline names (its ``store:``, ``manifest.mounts[].source``, ``outputs[].to``, ``manifest.files[].source``, an
``?endpoint=`` in any of them) and the providers it asks for are checked here before anything is opened, so
nothing a pipeline says can make the worker touch what the operator did not grant. The worker's check is the
authoritative one (`AppliedPolicy.check_run`, when a sandbox is provisioned, and again wherever an activity opens
a URL); a client holding the same policy checks early, before anything reaches workflow history.

Defaults grant nothing beyond the worker's own snapshot store: no ``file://`` folder, no pipeline-chosen endpoint
(so ambient credentials are never sent to an address a pipeline picked), every provider the worker offers.
The policy comes from ``TardigradePlugin(policy=...)``, ``tardigrade worker --policy FILE`` or the file named by
``TARDIGRADE_POLICY`` (YAML or JSON)::

    file_roots: [/srv/datasets, /srv/results]      # file:// mounts, outputs, stores and source: files
    endpoints:
      s3: ["https://minio.internal:9000"]          # exact ?endpoint= values s3:// URLs may name
      az: ["https://blob.internal/myaccount"]      # and az:// URLs; plain http only when listed exactly
    providers: [local]                             # default: every provider the worker offers

No Temporal here: the activities turn a `PolicyViolation` into a non-retryable failure.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tardigrade.sandboxes.errors import TardigradeError
from tardigrade.sandboxes.limits import LimitAboveCeiling, Limits
from tardigrade.sandboxes.network.policy import NetworkPolicy
from tardigrade.sandboxes.network.rules import NetworkRule, NetworkRuleError
from tardigrade.sandboxes.provider_choice import KNOWN as KNOWN_PROVIDERS
from tardigrade.sandboxes.provider_kit import SHIPPED, is_plugin_name

POLICY_ENV = "TARDIGRADE_POLICY"
#: Where each kind of URL comes from in a pipeline, for messages.
Use = Literal["store", "mount", "output"]


class PolicyError(TardigradeError):
    """A policy file or argument is not valid. One line naming the file and the field."""


class PolicyViolation(TardigradeError):
    """A pipeline asks for something the worker's policy does not grant. Names the pipeline field, the policy rule
    and what to change; never a credential."""

    def __init__(self, field: str, rule: str, problem: str, fix: str) -> None:
        super().__init__(f"{field}: {problem}, which the worker policy does not allow ({rule}); {fix}")
        self.field = field
        self.rule = rule


# -- the policy file ----------------------------------------------------------------------------------------------


def normalize_endpoint(url: str) -> str:
    """``HTTPS://Host:443/acct/`` -> ``https://host:443/acct``: scheme and host lower-case, the port explicit, no
    trailing slash. Raises ValueError for anything but a plain http(s) URL without credentials or query."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} is not a URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s)://host[:port][/path] URL")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{url!r} must have no user, password, query or fragment")
    port = port or (443 if scheme == "https" else 80)
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    path = posixpath.normpath(parts.path) if parts.path.strip("/") else ""
    return f"{scheme}://{host}:{port}{path.rstrip('/')}"


class EndpointRules(BaseModel):
    """Exact ``?endpoint=`` values pipelines may name, per URL scheme. ``gs://`` and ``r2://`` URLs take no
    endpoint (a GCS emulator is the worker's own ``STORAGE_EMULATOR_HOST``; R2's endpoint follows its account)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    s3: list[str] = Field(default_factory=list, description="Endpoints s3:// URLs may name (e.g. MinIO).")
    az: list[str] = Field(default_factory=list, description="Endpoints az:// URLs may name (e.g. Azurite).")

    @field_validator("s3", "az")
    @classmethod
    def _normalized(cls, v: list[str]) -> list[str]:
        out = []
        for i, url in enumerate(v):
            try:
                out.append(normalize_endpoint(url))
            except ValueError as e:
                raise ValueError(f"[{i}] {e}") from None
        return out


class WorkerPolicy(BaseModel):
    """What pipelines may reach on this worker. Every field's default grants nothing beyond the worker's own
    snapshot store and the providers it offers. Extend by adding one field (and its check in `AppliedPolicy`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    file_roots: list[str] = Field(
        default_factory=list,
        description="Absolute folders file:// mounts, outputs and stores, and manifest source: files, may use"
        " (after resolving symlinks). Default: none; the worker's own store is always allowed as a store.",
    )
    endpoints: EndpointRules = Field(
        default_factory=EndpointRules,
        description="Exact ?endpoint= values s3:// and az:// URLs may name. Default: none, so the worker's"
        " credentials only ever go to the cloud's own endpoints or those its environment names.",
    )
    providers: list[str] | None = Field(
        default=None, description="Sandbox providers pipelines may use. Default: every one the worker offers."
    )
    max_limits: Limits | None = Field(
        default=None,
        description="Ceilings for sandbox.limits (memory, pids, cpu, disk, tmp; sandboxes/limits.py): a pipeline"
        " asking for more fails before any step; defaults above a ceiling are lowered to it. Default: no ceilings.",
    )
    network: NetworkPolicy = Field(
        default_factory=NetworkPolicy,
        description="Which sandbox.network modes pipelines may use (modes), which hosts an allowlist may name"
        " (hosts) and which internal addresses stay reachable (reachable); sandboxes/network/policy.py.",
    )
    # Room for more rules, one field each, checked in AppliedPolicy.check_run.

    @field_validator("file_roots")
    @classmethod
    def _roots(cls, v: list[str]) -> list[str]:
        out = []
        for i, root in enumerate(v):
            expanded = os.path.expanduser(root.strip())
            if not expanded.startswith("/"):
                raise ValueError(f"[{i}] {root!r} is not an absolute folder; write it as /srv/datasets")
            if ".." in expanded.split("/"):
                raise ValueError(f"[{i}] {root!r} contains '..'; name the folder itself")
            normalized = posixpath.normpath(expanded)
            if normalized in ("/", "//"):
                raise ValueError(f"[{i}] '/' would grant every file of the worker; name the folders pipelines may use")
            out.append(normalized)
        return out

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if name not in KNOWN_PROVIDERS and not is_plugin_name(name):
                raise ValueError(
                    f"unknown provider {name!r}; use {', '.join(KNOWN_PROVIDERS + SHIPPED)} or a qualified"
                    " entry-point name such as acme.vm"
                )
        return v


def _field_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_policy(data: Any, source: str) -> WorkerPolicy:
    """A policy from parsed YAML/JSON; `PolicyError` names ``source`` and the first wrong field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping with file_roots, endpoints, providers")
    try:
        return WorkerPolicy.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = _field_path(first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            known = ", ".join(WorkerPolicy.model_fields) if len(first["loc"]) == 1 else "s3, az"
            if first["loc"][0] == "network" and len(first["loc"]) == 2:
                known = ", ".join(NetworkPolicy.model_fields)
            msg = f"unknown key (the policy takes {known})"
        more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
        raise PolicyError(f"{source}: {where}: {msg}{more}") from None


def load_policy(path: str | Path) -> WorkerPolicy:
    """Read a YAML or JSON policy file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError(f"policy file {path}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise PolicyError(f"policy file {path}: not valid {kind}: {first}") from None
    return parse_policy(data, f"policy file {path}")


def resolve_policy(policy: WorkerPolicy | str | Path | None) -> WorkerPolicy:
    """The policy as given (an object or a file), else the file named by ``TARDIGRADE_POLICY``, else the default."""
    if isinstance(policy, WorkerPolicy):
        return policy
    if policy is not None:
        return load_policy(policy)
    if named := os.environ.get(POLICY_ENV):
        return load_policy(named)
    return WorkerPolicy()


def client_policy() -> WorkerPolicy | None:
    """The policy a client checks pipelines against: the file ``TARDIGRADE_POLICY`` names, if any."""
    named = os.environ.get(POLICY_ENV)
    return load_policy(named) if named else None


# -- applying it ----------------------------------------------------------------------------------------------------


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def resolved_folder(path: str) -> str:
    """``path`` with every symlink that exists resolved (what the worker would really open)."""
    return os.path.realpath(path)


def _file_path(url: str) -> str | None:
    """The local path a URL names (``file://`` or a bare path), or None for a cloud URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "file":
        return parts.path
    return url if not parts.scheme else None


@dataclass(frozen=True)
class AppliedPolicy:
    """A policy as one worker (or client) applies it: its roots resolved, and the worker's own folders known.

    ``own_stores``: the worker's own snapshot store(s) (its default store URL), always allowed as a ``store:``.
    ``private``: the worker's state folders (sandboxes, caches, the embedded server's database): never a mount, an
    output or any other store, even when a file root contains them."""

    policy: WorkerPolicy
    own_stores: tuple[str, ...] = ()
    private: tuple[str, ...] = ()

    @classmethod
    def for_worker(
        cls, policy: WorkerPolicy, *, state_dirs: Iterable[Path], own_stores: Iterable[str]
    ) -> AppliedPolicy:
        return cls(
            policy=policy,
            own_stores=tuple(own_stores),
            private=tuple(sorted({resolved_folder(str(Path(d).absolute())) for d in state_dirs})),
        )

    @property
    def _roots(self) -> list[str]:
        """The file roots with their symlinks resolved now (a root may be a link to the real folder)."""
        return [resolved_folder(r) for r in self.policy.file_roots]

    # -- single checks ---------------------------------------------------------------------------------------

    def check_url(self, url: str, field: str, use: Use) -> None:
        """A store, mount source or output destination URL: its folder, or its endpoint."""
        try:
            local = _file_path(url)
        except ValueError:
            return  # not parseable: opening it fails with the store's own message, before any I/O
        if local is not None:
            self._check_folder(url, local, field, use)
            return
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        endpoints = parse_qs(parts.query, keep_blank_values=True).get("endpoint")
        if not endpoints or (use == "store" and url in self.own_stores):
            return
        allowed: list[str] = getattr(self.policy.endpoints, scheme, None) or []
        for endpoint in endpoints:
            try:
                normalized = normalize_endpoint(endpoint)
            except ValueError:
                normalized = None
            if normalized is None or normalized not in allowed:
                shown = normalized or "an endpoint that is not a plain http(s) URL"
                key = f"endpoints.{scheme}" if scheme in EndpointRules.model_fields else "endpoints"
                raise PolicyViolation(
                    field,
                    key,
                    f"names endpoint {shown}",
                    f"the worker never sends its credentials to an endpoint a pipeline picks; ask the worker's"
                    f" operator to list it under {key} in the policy file, or drop ?endpoint=",
                )

    def _check_folder(self, url: str, path: str, field: str, use: Use) -> None:
        what = {"store": "a store folder", "mount": "a mounted folder", "output": "an output folder"}[use]
        if not path.startswith("/"):
            raise PolicyViolation(field, "file_roots", f"{path!r} is not an absolute path", "use file:///absolute/path")
        if ".." in path.split("/"):
            raise PolicyViolation(field, "file_roots", f"{path!r} contains '..'", "name the folder itself")
        real = resolved_folder(path)
        if use == "store" and any(real == resolved_folder(p) for p in self._own_store_folders()):
            return
        if any(_inside(real, d) or _inside(d, real) for d in self.private):
            raise PolicyViolation(
                field,
                "the worker's state folder",
                f"{real} is (or holds) the worker's own state folder (sandboxes, caches, its database)",
                "use a folder of its own under one of the policy's file_roots",
            )
        if not any(_inside(real, root) for root in self._roots):
            roots = ", ".join(self._roots) if self._roots else "none"
            shown = path if real == posixpath.normpath(path) else f"{path} (really {real})"
            raise PolicyViolation(
                field,
                "file_roots",
                f"{shown} is {what} outside the allowed folders (file_roots: {roots})",
                "use a folder inside one of them, or ask the worker's operator to add one to file_roots in the"
                " policy file (tardigrade worker --policy FILE, or TARDIGRADE_POLICY)",
            )

    def _own_store_folders(self) -> list[str]:
        out = []
        for url in self.own_stores:
            try:
                local = _file_path(url)
            except ValueError:
                continue
            if local is not None:
                out.append(local)
        return out

    def check_local_file(self, path: Path, field: str, base_dir: Path) -> None:
        """A manifest ``source:`` file read by the client: inside ``base_dir`` (the pipeline's folder) or a root."""
        real = resolved_folder(str(path))
        base = resolved_folder(str(base_dir))
        if _inside(real, base) or any(_inside(real, root) for root in self._roots):
            return
        raise PolicyViolation(
            field,
            "file_roots",
            f"{path} resolves to {real}, outside the pipeline's folder ({base})",
            "copy the file into the pipeline's folder, or add its folder to file_roots in the policy file",
        )

    def limits_for(self, limits: Limits) -> Limits:
        """The limits a sandbox gets: the pipeline's, defaults filled in, under the policy's ``max_limits``."""
        if self.policy.max_limits is None:
            return limits.resolved()
        try:
            return limits.within(self.policy.max_limits)
        except LimitAboveCeiling as e:
            raise PolicyViolation(
                f"sandbox.limits.{e.limit}",
                f"max_limits.{e.limit}: {e.ceiling}",
                f"asks for {e.asked}",
                f"ask for at most {e.ceiling}, or have the worker's operator raise max_limits.{e.limit}",
            ) from None

    def check_network(self, network: Any, field: str = "sandbox.network") -> NetworkRule:
        """A pipeline's ``sandbox.network`` (false/true/{allow: [...]}) against the policy's ``network`` rules."""
        try:
            rule = NetworkRule.parse(network, field)
        except NetworkRuleError as e:
            problem = str(e).removeprefix(field).removeprefix(".").strip()
            raise PolicyViolation(field, "network", problem, "fix the pipeline") from None
        if (violation := self.policy.network.violation(rule)) is not None:
            raise PolicyViolation(field, *violation)
        return rule

    def check_brokered(self, secrets: Sequence[Any], network: NetworkRule) -> None:
        """Brokered secrets (``{name, hosts}`` in ``manifest.secrets``) make their hosts reachable through the egress
        proxy, so the policy's network rules apply to those hosts as to an allowlist (``network: true`` already
        reaches every public host). Plain names in ``secrets`` are skipped."""
        if network.mode == "internet":
            return
        for i, secret in enumerate(secrets):
            if isinstance(secret, str):
                continue
            field = f"manifest.secrets[{i}].hosts"
            if "allow" not in self.policy.network.modes:
                raise PolicyViolation(
                    field,
                    "network.modes",
                    f"brokers {secret.name} to {', '.join(secret.hosts)}, which opens those hosts as an allowlist does",
                    "list the secret by name only, or ask the worker's operator to add allow to network.modes",
                )
            if (violation := self.policy.network.violation(NetworkRule("allow", tuple(secret.hosts)))) is not None:
                raise PolicyViolation(field, *violation)

    def allows_provider(self, name: str) -> bool:
        return self.policy.providers is None or name in self.policy.providers

    def check_providers(self, preferences: Sequence[str], field: str = "sandbox.provider") -> None:
        if not any(self.allows_provider(p) for p in preferences):
            allowed = ", ".join(self.policy.providers or [])
            raise PolicyViolation(
                field,
                "providers",
                f"asks for {', '.join(preferences)}",
                f"use one of {allowed} or ask the worker's operator to add it to providers in the policy file",
            )

    # -- a whole run ----------------------------------------------------------------------------------------------

    def check_run(
        self,
        *,
        store: str,
        mount_sources: Sequence[str] = (),
        output_urls: Sequence[str] = (),
        providers: Sequence[str] = (),
        limits: Limits | None = None,
        network: Any = None,
        secrets: Sequence[Any] = (),
    ) -> None:
        """Everything a run names, in the order a reader meets it in the file; raises the first violation.
        ``secrets`` are the Manifest's entries; brokered ones are checked like an allowlist (`check_brokered`)."""
        if providers:
            self.check_providers(providers)
        rule = self.check_network(network) if network is not None else NetworkRule("off")
        self.check_brokered(secrets, rule)
        if limits is not None:
            self.limits_for(limits)
        for i, source in enumerate(mount_sources):
            self.check_url(source, f"manifest.mounts[{i}].source", "mount")
        self.check_url(store, "store", "store")
        for i, url in enumerate(output_urls):
            self.check_url(url, f"outputs[{i}].to", "output")
