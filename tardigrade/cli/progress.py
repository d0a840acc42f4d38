"""Live progress of a run, as `tardigrade run --wait` and `tardigrade demo` show it.

One line per completed step, one for every retry and every lost sandbox, and - on a terminal - a progress bar
(rich) with the current step and phase under them. It learns everything from the workflow's `status` query, so
it works for any run, from any machine; a query that fails (no worker yet, a busy workflow task) is skipped.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tardigrade.workflows.pipeline import PipelineWorkflow
from tardigrade.workflows.state import RunStatus

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

#: How often the status is queried, and how long one query may wait for a worker.
POLL_INTERVAL = 0.3
QUERY_TIMEOUT = timedelta(seconds=5)


class RunProgress:
    """Use as a context manager around `watch`: the bar (if any) is removed when it exits, the lines stay."""

    def __init__(
        self, step_names: list[str], *, say: Callable[[str], None] | None = None, bar: bool | None = None
    ) -> None:
        self.step_names = step_names
        self.shown = 0
        self.rehydrations = 0
        self.last_error: str | None = None
        self._say = say
        self._bar = sys.stdout.isatty() if bar is None else bar
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> RunProgress:
        if self._bar and self._say is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=True,  # the bar goes away at the end; the step lines above it stay
            )
            self._progress.start()
            self._task = self._progress.add_task("starting", total=len(self.step_names))
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def say(self, message: str) -> None:
        if self._say is not None:
            self._say(message)
        elif self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(message, flush=True)

    def show_completed(self, completed: int) -> None:
        while self.shown < min(completed, len(self.step_names)):
            self.say(f"  step {self.shown + 1:>2}/{len(self.step_names)} · {self.step_names[self.shown]} ✓")
            self.shown += 1
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.shown)

    def update(self, status: RunStatus) -> None:
        self.show_completed(status.steps_completed)
        if status.rehydrations > self.rehydrations:
            self.rehydrations = status.rehydrations
            self.last_error = status.last_error
            self.say(f"  !! {status.last_error}")
            self.say("  -> fresh sandbox: manifest applied, last snapshot restored, resuming at the failed step")
        elif status.last_error and status.last_error != self.last_error:
            self.last_error = status.last_error
            self.say(f"  !! {status.last_error}")
        if self._progress is not None and self._task is not None:
            where = (
                f"step {status.current_step}/{status.steps_total} · {status.current_step_name}"
                if status.current_step
                else status.pipeline
            )
            self._progress.update(self._task, description=f"{where} — {status.phase}")

    async def watch(self, handle: Any) -> None:
        """Follow the run until cancelled (the caller cancels it once the run's result is in)."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                status: RunStatus = await handle.query(PipelineWorkflow.status, rpc_timeout=QUERY_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception:
                continue  # no worker yet, or a query racing a workflow task: the next one will do
            self.update(status)
