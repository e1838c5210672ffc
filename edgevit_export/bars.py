"""Progress events rendered with rich (CLI side): a spinner line for each stage, ticked off as
"✓ stage (duration)" when the next event arrives, and a bar for each counted task. After an
error everything vanishes, so the error is the one line left."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from .progress import Event


class _Counted(ProgressColumn):
    """A column shown for counted tasks only: a stage's row is its name and, once done, its time."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task):
        return self.column.render(task) if task.fields.get("counted") else Text("")


class Bars:
    """A :data:`~edgevit_export.progress.Callback` for ``with Bars(console) as bars: api_call(progress=bars)``.

    ``transient``: the bars vanish when done (they always do after an error, so the error is the
    one line left); ``eta``: a time-remaining column."""

    def __init__(self, console: Console, *, transient: bool = False, eta: bool = False):
        columns = [SpinnerColumn(finished_text=" "), TextColumn("{task.description}")] + [_Counted(c) for c in (
            BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            *((TextColumn("eta"), TimeRemainingColumn()) if eta else ()))]
        self.progress = Progress(*columns, console=console, transient=transient)
        self.tasks: dict[str, int] = {}
        self.stage: tuple[str, int, float] | None = None   # (name, task id, start)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._end_stage()
        if exc_type is not None:
            self.progress.live.transient = True
        self.progress.__exit__(exc_type, exc, tb)

    def _end_stage(self) -> None:
        if self.stage is not None:
            name, tid, t0 = self.stage
            took = time.perf_counter() - t0
            self.progress.update(tid, description=f"[dim]✓ {name} ({took:.1f}s)[/]", total=1, completed=1)
            self.stage = None

    def __call__(self, e: Event) -> None:
        self._end_stage()
        if not e.counted:
            self.stage = (e.task, self.progress.add_task(f"{e.task}…", total=None), time.perf_counter())
            return
        if e.task not in self.tasks:
            self.tasks[e.task] = self.progress.add_task(e.task, total=e.total, counted=True)
        self.progress.update(self.tasks[e.task], completed=e.done, total=e.total)
