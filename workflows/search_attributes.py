"""The custom search attributes of a pipeline run, for finding runs in the Web UI, `temporal workflow list` and
`tardigrade list`: ``TardigradePipeline = "nightly" AND TardigradePhase = "failed"``.

Search attributes must be registered on the namespace before a workflow may set them (an unknown one fails the
workflow task, over and over). The embedded dev server registers them at start (tardigrade/devserver.py); on
another server an operator registers them once (``temporal operator search-attribute create``, see the README).
The client checks which are registered when it starts a run and tells the workflow in `RunInput`, so a server
without them still runs pipelines, just without these attributes.

Search attributes are indexed as plain text, never encrypted: with encrypted history only the step and the phase
are set, not the pipeline's name or provider. Deterministic: imported by the workflow.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

PIPELINE = SearchAttributeKey.for_keyword("TardigradePipeline")
STEP = SearchAttributeKey.for_int("TardigradeStep")  # 1-based; 0 before the first step
PHASE = SearchAttributeKey.for_keyword("TardigradePhase")  # running, rehydrating, waiting, completed, ...
PROVIDER = SearchAttributeKey.for_keyword("TardigradeProvider")

#: Name -> type, as `temporal server start-dev --search-attribute NAME=TYPE` and the operator API spell them.
SEARCH_ATTRIBUTES = {PIPELINE.name: "Keyword", STEP.name: "Int", PHASE.name: "Keyword", PROVIDER.name: "Keyword"}

# The workflow's fine-grained phases, folded into the few worth searching for; each upsert is a history event, so
# a step costs about one, not one per checkpoint or rollback.
_SEARCHED_PHASE = {
    "starting": "running",
    "provisioning": "running",
    "running": "running",
    "checkpointing": "running",
    "rolling back": "running",
    "publishing outputs": "running",
    "rehydrating": "rehydrating",
    "waiting for the store": "waiting",
}


def searched_phase(phase: str) -> str:
    """The value of TardigradePhase for one of the workflow's phases (completed, failed, cancelled: as they are)."""
    return _SEARCHED_PHASE.get(phase, phase)
