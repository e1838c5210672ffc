"""Errors a user can cause, and failed checks.

Every error a user can cause is an :class:`EdgeExportError`; the CLI prints its message in one
line and exits 2. A check that fails (parity, structure, accuracy drop) is a :class:`CheckFailed`
and exits 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): third-party
    errors quoted inside our one-line messages."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class EdgeExportError(Exception):
    """Bad input or usage: one line that says what to do. Exit code 2."""

    exit_code = 2


class UnknownModelError(EdgeExportError):
    def __init__(self, name: str, known: list[str]):
        close = difflib.get_close_matches(str(name).strip().lower().replace("-", "_"), known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        super().__init__(f"unknown model '{name}'.{hint} Run 'edgevit-export list' to see all models.")


class ResolutionError(EdgeExportError):
    pass


class WeightsError(EdgeExportError):
    pass


class OutputError(EdgeExportError):
    pass


class DataError(EdgeExportError):
    pass


class CannotRun(EdgeExportError):
    """A runner cannot execute an artifact (an op it does not implement, say). On its own it is a
    one-line error; during an export the artifact is kept and the parity check fails with it."""


class CheckFailed(Exception):
    """A numeric or structural check failed. Exit code 1."""

    exit_code = 1
