"""What ``sandbox.options`` may say, per provider: nothing undocumented reaches bubblewrap or a provider's SDK.

Each provider reads a few documented keys (E2B: its template, Modal: its image, ...). Options are validated here
against the providers a pipeline names: a key no listed provider takes, or a value of the wrong type, is an error
naming the key and listing what is accepted. The local (bubblewrap) provider takes no options at all, so no host
path or bwrap flag can be smuggled in through them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LocalOptions(_Options):
    """The local provider (bubblewrap) takes no options: its sandbox is always the same shape."""


class E2BOptions(_Options):
    template: str = Field(default="base", min_length=1, description="The E2B template the sandbox boots from.")
    lifetime: int = Field(default=3600, gt=0, description="Seconds E2B keeps an idle sandbox (renewed on attach).")
    native_snapshot: bool = Field(default=False, description="Also take E2B's own snapshot at every checkpoint.")


class ModalOptions(_Options):
    image: str | None = Field(default=None, min_length=1, description="A registry image tag (default Debian slim).")
    cpu: float | None = Field(default=None, gt=0, description="CPU cores.")
    memory: int | None = Field(default=None, gt=0, description="Memory in MiB.")
    app: str = Field(default="tardigrade", min_length=1, description="The Modal app the sandboxes belong to.")
    lifetime: int = Field(default=86400, gt=0, description="Seconds before Modal ends the sandbox (at most 24 h).")
    native_snapshot: bool = Field(default=False, description="Also take Modal's filesystem snapshot at checkpoints.")


DEFAULT_DAYTONA_AUTO_STOP = 60  # minutes


class DaytonaOptions(_Options):
    """Daytona (sandboxes/daytona.py, registered through the provider kit's entry point)."""

    snapshot: str | None = Field(default=None, min_length=1, description="The Daytona snapshot to boot from.")
    image: str | None = Field(default=None, min_length=1, description="A registry image to boot from instead.")
    cpu: float | None = Field(default=None, gt=0, description="CPU cores (with image; rounded up).")
    memory: int | None = Field(default=None, gt=0, description="Memory in MiB (with image; rounded up to GiB).")
    disk: int | None = Field(default=None, gt=0, description="Disk in GiB (with image).")
    auto_stop_interval: int = Field(
        default=DEFAULT_DAYTONA_AUTO_STOP, ge=0, description="Minutes idle before Daytona stops it (0: never)."
    )
    native_snapshot: bool = Field(default=False, description="Also take a Daytona snapshot at every checkpoint.")


class RunloopOptions(_Options):
    """Runloop devboxes (sandboxes/runloop.py)."""

    blueprint: str | None = Field(default=None, min_length=1, description="The Runloop blueprint (name) to boot from.")
    resource_size: Literal["X_SMALL", "SMALL", "MEDIUM", "LARGE", "X_LARGE", "XX_LARGE"] | None = Field(
        default=None, description="Runloop's resource size (SMALL: 1 CPU, 2 GiB; MEDIUM: 2 CPU, 4 GiB; ...)."
    )
    keep_alive: int = Field(
        default=86400, gt=0, le=172800, description="Seconds idle before Runloop shuts it down (at most 48 h)."
    )
    idle_suspend: int | None = Field(
        default=None, gt=0, description="Seconds idle before Runloop suspends the devbox (its disk is kept)."
    )
    native_snapshot: bool = Field(default=False, description="Also take a Runloop disk snapshot at checkpoints.")


DEFAULT_VERCEL_LIFETIME = 2700  # seconds: Vercel's Hobby maximum (45 min); Pro/Enterprise allow more


class VercelOptions(_Options):
    """Vercel sandboxes (sandboxes/vercel.py)."""

    image: str | None = Field(default=None, min_length=1, description="A Vercel Container Registry image to boot.")
    vcpus: int | None = Field(default=None, gt=0, description="vCPUs (Vercel gives 2 GB of memory per vCPU).")
    memory: int | None = Field(default=None, gt=0, description="Memory in MB.")
    region: str | None = Field(default=None, min_length=1, description="The Vercel region (default: the SDK's).")
    lifetime: int = Field(
        default=DEFAULT_VERCEL_LIFETIME,
        gt=0,
        description="Seconds a sandbox session may run (plan maximum: 45 min Hobby, more on Pro); past it the"
        " sandbox is lost and the run rehydrates on a new one.",
    )
    native_snapshot: bool = Field(
        default=False, description="Also take a Vercel snapshot at every checkpoint (it restarts the session)."
    )


class BlaxelOptions(_Options):
    """Blaxel sandboxes (sandboxes/blaxel.py)."""

    image: str | None = Field(
        default=None,
        min_length=1,
        description="A Debian/Ubuntu-based image to boot (default: the worker's BLAXEL_IMAGE; Blaxel's own is Alpine).",
    )
    memory: int | None = Field(default=None, gt=0, description="Memory in MiB (CPU follows it; Blaxel default 4096).")
    region: str | None = Field(default=None, min_length=1, description="Region, such as us-pdx-1 (or BL_REGION).")
    idle_ttl: str | None = Field(
        default="24h",
        pattern=r"^[0-9]+[smhdw]$",
        description="Delete the sandbox after this long unused, such as 30m or 7d (at least 60s; null: never).",
    )
    native_snapshot: bool = Field(default=False, description="Also take a Blaxel snapshot at every checkpoint.")


class CloudflareOptions(_Options):
    """Cloudflare sandboxes behind the bridge Worker (sandboxes/cloudflare.py, clients/cloudflare-bridge/)."""

    native_snapshot: bool = Field(
        default=False, description="Also take Cloudflare backups (R2) of /workspace and /home/sandbox at checkpoints."
    )
    backup_ttl: int = Field(
        default=259200, gt=0, description="Seconds Cloudflare keeps a native backup (its default: 3 days)."
    )


PROVIDER_OPTIONS: dict[str, type[_Options]] = {
    "local": LocalOptions,
    "e2b": E2BOptions,
    "modal": ModalOptions,
    "daytona": DaytonaOptions,
    "runloop": RunloopOptions,
    "vercel": VercelOptions,
    "blaxel": BlaxelOptions,
    "cloudflare": CloudflareOptions,
}


#: The provider names a pipeline may use unqualified: built in, or shipped here through the provider kit's entry
#: point (daytona and the others after it). Third-party providers (sandboxes/provider_kit.py) are named
#: ``vendor.provider``.
NAMED_PROVIDERS = ("local", "e2b", "modal", "daytona", "runloop", "vercel", "blaxel", "cloudflare")
QUALIFIED_PROVIDER = re.compile(r"^[a-z][a-z0-9_-]{0,39}\.[a-z][a-z0-9_.-]{0,79}$")


def is_provider_name(name: str) -> bool:
    """A name ``sandbox.provider`` accepts: named above, or a qualified entry-point name (checked at provision)."""
    return name in NAMED_PROVIDERS or bool(QUALIFIED_PROVIDER.match(name))


def _is_third_party(provider: str) -> bool:
    """A qualified ``vendor.provider`` name (sandboxes/provider_kit.py): its provider checks its own options."""
    return provider not in NAMED_PROVIDERS and bool(QUALIFIED_PROVIDER.match(provider))


def accepted(provider: str) -> list[str]:
    return list(PROVIDER_OPTIONS[provider].model_fields)


def check_options(options: Mapping[str, Any], providers: Sequence[str]) -> None:
    """Raise ValueError naming the first key no listed provider accepts, or a value one of them would refuse."""
    if any(_is_third_party(p) for p in providers):
        providers = [p for p in providers if p in PROVIDER_OPTIONS]  # unknown keys may be the third party's
        options = {k: v for k, v in options.items() if any(k in PROVIDER_OPTIONS[p].model_fields for p in providers)}
    for key in options:
        if not any(key in PROVIDER_OPTIONS[p].model_fields for p in providers if p in PROVIDER_OPTIONS):
            takes = "; ".join(
                f"{p}: {', '.join(accepted(p)) or 'no options'}" for p in providers if p in PROVIDER_OPTIONS
            )
            raise ValueError(f"unknown key {key!r} for provider {', '.join(providers)} (accepted: {takes})")
    for p in providers:
        model = PROVIDER_OPTIONS.get(p)
        if model is None:
            continue
        mine = {k: v for k, v in options.items() if k in model.model_fields}
        # JSON numbers: an integer is a fine float (cpu: 2).
        if isinstance(mine.get("cpu"), int) and not isinstance(mine.get("cpu"), bool):
            mine["cpu"] = float(mine["cpu"])
        try:
            model.model_validate(mine)
        except ValidationError as e:
            first = e.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{key}: {first['msg']} ({p} option)") from None


def describe_options() -> str:
    """Which keys each provider takes, in words (for the pipeline schema's description)."""
    return "; ".join(f"{p} takes {', '.join(accepted(p)) or 'none'}" for p in PROVIDER_OPTIONS)


#: Every key some provider takes, for the JSON Schema (which cannot tell which provider a key belongs to).
ALL_PROVIDER_OPTIONS = frozenset(k for model in PROVIDER_OPTIONS.values() for k in model.model_fields)
