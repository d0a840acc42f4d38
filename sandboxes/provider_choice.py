"""Which sandbox providers a worker offers, and how a run picks one.

A pipeline names one provider (``sandbox: {provider: e2b}``) or a preference list (``provider: [local, e2b]``).
A worker offers the providers it was given (``TardigradePlugin(providers=...)``) plus those it can build from its
environment: ``local`` (bubblewrap), ``e2b`` (``E2B_API_KEY``), ``modal`` (``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET``
or ``~/.modal.toml``), and the providers installed packages register in the ``tardigrade.providers`` entry-point
group (sandboxes/provider_kit.py; ``daytona`` is one); ``TARDIGRADE_PROVIDERS=local,e2b`` narrows that down.

The worker that provisions a sandbox takes the first provider of the list it offers - skipping the providers
whose sandboxes were lost since the run last completed a step, as long as it offers another one. So a run on
``[local, e2b]`` whose local sandbox (or its whole host) dies is rehydrated on E2B from the portable snapshot, and
comes back to the first choice the next time it has to provision after completing steps there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tardigrade.sandboxes import provider_kit
from tardigrade.sandboxes.errors import ProviderUnavailable
from tardigrade.sandboxes.provider import FaultInjector, SandboxProvider

KNOWN = ("local", "e2b", "modal")


def allowed_by_environment(name: str) -> bool:
    allowed = os.environ.get("TARDIGRADE_PROVIDERS")
    return allowed is None or name in {p.strip() for p in allowed.split(",") if p.strip()}


def build_provider(
    name: str, state_dir: Path, *, worker_id: str, fault_injector: FaultInjector | None = None
) -> SandboxProvider:
    """A provider from this worker's environment. Raises `ProviderUnavailable` saying what to configure."""
    if name not in KNOWN and not provider_kit.is_plugin_name(name):
        raise ProviderUnavailable(
            f"unknown sandbox provider {name!r}; use one of {', '.join(KNOWN + provider_kit.SHIPPED)} or an"
            f" installed {provider_kit.GROUP} entry point ({', '.join(provider_kit.installed()) or 'none'})"
        )
    if not allowed_by_environment(name):
        offered = os.environ["TARDIGRADE_PROVIDERS"]
        raise ProviderUnavailable(f"this worker does not offer the {name} provider (TARDIGRADE_PROVIDERS={offered})")
    if name not in KNOWN:  # daytona and third-party providers: the provider kit's entry points
        return provider_kit.build(name, state_dir, worker_id=worker_id, fault_injector=fault_injector)
    if name == "local":
        from tardigrade.sandboxes.bubblewrap import LocalSandboxProvider

        return LocalSandboxProvider(state_dir / "sandboxes", worker_id=worker_id, fault_injector=fault_injector)
    if name == "e2b":
        from tardigrade.sandboxes.e2b import E2BProvider

        return E2BProvider.from_env(state_dir / "remote" / "e2b")
    from tardigrade.sandboxes.modal import ModalProvider

    return ModalProvider.from_env(state_dir / "remote" / "modal")


def choose(preferences: Sequence[str], avoid: Sequence[str], get: Callable[[str], SandboxProvider]) -> SandboxProvider:
    """The first offered provider of ``preferences`` not in ``avoid`` (else the first offered one at all)."""
    offered: list[SandboxProvider] = []
    reasons: list[str] = []
    for name in preferences:
        try:
            offered.append(get(name))
        except ProviderUnavailable as e:
            reasons.append(str(e))
    if not offered:
        raise ProviderUnavailable(
            "none of the pipeline's sandbox providers is available on this worker: " + "; ".join(reasons)
        )
    return next((p for p in offered if p.name not in avoid), offered[0])
