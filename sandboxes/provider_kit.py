"""Sandbox providers from other packages: the ``tardigrade.providers`` entry-point group.

A package adds a provider without touching this repository by declaring, in its own pyproject.toml::

    [project.entry-points."tardigrade.providers"]
    "acme.vm" = "acme_tardigrade:provider_factory"

The entry point names a callable ``factory(name, state_dir, *, worker_id, fault_injector=None)`` returning a
`SandboxProvider` (the arguments sandboxes/provider_choice.py passes the built-in ones). It raises
`ProviderUnavailable` naming the extra to install and the variables to set when the worker cannot build one. It may
carry an ``options`` attribute: a pydantic model of the ``sandbox.options`` keys it takes, which the worker checks
before the first sandbox. Pipelines name such a provider by its entry-point name.

Names: the names this repository ships (``daytona``, ``runloop``, ``vercel``, ``blaxel``, ``cloudflare``) are plain;
a third-party provider's name is qualified, as ``<vendor>.<provider>`` (``acme.vm``), so it can never collide with a
future built-in and a typo in a built-in name (``e2d``) is still refused when the pipeline is read. Entry points are
read on the worker, at provision: a pipeline is validated (also inside the deterministic workflow) by the name's
shape alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Protocol

from tardigrade.sandboxes.errors import ProviderUnavailable
from tardigrade.sandboxes.provider import FaultInjector, SandboxProvider
from tardigrade.sandboxes.provider_options import QUALIFIED_PROVIDER

GROUP = "tardigrade.providers"
#: Providers this repository ships through the entry-point group (so a pipeline may name them unqualified).
SHIPPED = ("daytona", "runloop", "vercel", "blaxel", "cloudflare")
#: The extra that installs each shipped provider's SDK.
SHIPPED_EXTRAS = {name: name for name in SHIPPED}


class ProviderFactory(Protocol):
    def __call__(
        self, name: str, state_dir: Path, *, worker_id: str, fault_injector: FaultInjector | None = None
    ) -> SandboxProvider: ...


def is_plugin_name(name: str) -> bool:
    """A name a pipeline may use for an entry-point provider (shipped, or qualified ``vendor.provider``)."""
    return name in SHIPPED or bool(QUALIFIED_PROVIDER.match(name))


@functools.cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def installed() -> list[str]:
    """The provider names installed packages register."""
    return sorted(_entry_points())


def load_factory(name: str) -> ProviderFactory:
    """The factory registered for ``name``; `ProviderUnavailable` saying what to install if none is."""
    entry = _entry_points().get(name)
    if entry is None:
        if name in SHIPPED:
            hint = (
                f"reinstall tardigrade-temporal with its {SHIPPED_EXTRAS[name]} extra:"
                f" pip install 'tardigrade-temporal[{SHIPPED_EXTRAS[name]}]'"
            )
        else:
            hint = "install the package that provides it on this worker"
        others = ", ".join(installed()) or "none"
        raise ProviderUnavailable(
            f"no installed package registers the sandbox provider {name!r} in the {GROUP!r} entry-point group"
            f" (registered: {others}); {hint}"
        )
    try:
        factory = entry.load()
    except ImportError as e:
        raise ProviderUnavailable(
            f"the sandbox provider {name!r} ({entry.value}) cannot be imported on this worker: {e}"
        ) from None
    if not callable(factory):
        raise ProviderUnavailable(f"the {GROUP} entry point {name!r} ({entry.value}) is not a callable factory")
    result: ProviderFactory = factory
    return result


def options_model(factory: Callable[..., Any]) -> Any:
    """The pydantic model of the options a factory's provider takes, or None (it takes none it declares)."""
    return getattr(factory, "options", None)


def build(
    name: str, state_dir: Path, *, worker_id: str, fault_injector: FaultInjector | None = None
) -> SandboxProvider:
    factory = load_factory(name)
    provider = factory(name, state_dir, worker_id=worker_id, fault_injector=fault_injector)
    if not isinstance(provider, SandboxProvider):
        raise ProviderUnavailable(
            f"the {GROUP} entry point {name!r} returned {type(provider).__name__}, not a SandboxProvider"
        )
    return provider
