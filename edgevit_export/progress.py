"""The one progress event the API reports through: a stage starting, or a counted task moving on.

Every long-running API function takes ``progress: Callback | None``; the CLI renders the events
(a status line per stage, a bar per counted task). Nothing else crosses that boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Event:
    """``total == 0``: the stage ``task`` starts now. ``total > 0``: ``done`` of ``total`` items of
    ``task`` are finished (a bar)."""

    task: str
    done: int = 0
    total: int = 0

    @property
    def counted(self) -> bool:
        return self.total > 0


Callback = Callable[[Event], None]


def emit(callback: Callback | None, task: str, done: int = 0, total: int = 0) -> None:
    """Report to ``callback`` if there is one."""
    if callback is not None:
        callback(Event(task, done, total))


def prefixed(callback: Callback | None, prefix: str) -> Callback | None:
    """The same callback with every task name prefixed (a sub-step of a larger job)."""
    if callback is None:
        return None
    return lambda e: callback(Event(f"{prefix}{e.task}", e.done, e.total))
