"""The one progress event the API reports through: a stage starting, or a counted task moving on.

Every long-running API function takes ``progress: Callback | None``; the CLI renders the events
(a status line per stage, a bar per counted task). Nothing else crosses that boundary.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

_interrupted = False


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
    """Report to ``callback`` if there is one; raise KeyboardInterrupt again if a Ctrl-C was
    swallowed since (see :func:`sticky_interrupts`)."""
    raise_if_interrupted()
    if callback is not None:
        callback(Event(task, done, total))


def prefixed(callback: Callback | None, prefix: str) -> Callback | None:
    """The same callback with every task name prefixed (a sub-step of a larger job)."""
    if callback is None:
        return None
    return lambda e: callback(Event(f"{prefix}{e.task}", e.done, e.total))


def raise_if_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


@contextmanager
def sticky_interrupts():
    """Ctrl-C that no library can swallow: converters have bare ``except:`` clauses (coremltools'
    torch frontend has a dozen) that catch the KeyboardInterrupt and carry on. The handler records
    it, and the next progress event (or the commit of the artifacts) raises it again. Main thread
    only; elsewhere nothing changes."""
    global _interrupted
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_sig, _frame):
        global _interrupted
        _interrupted = True
        raise KeyboardInterrupt

    _interrupted = False
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted = False
