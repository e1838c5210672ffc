"""Silencing what native runtimes write straight to file descriptor 2 (cpuinfo probing, delegate
banners, absl's "log messages before InitializeLog" line): Python's ``redirect_stderr`` does not
reach them. Everything here is a no-op with ``edgevit-export -v`` (``EDGEVIT_EXPORT_VERBOSE=1``):
the runtimes' own lines are then shown, for a bug report."""

from __future__ import annotations

import contextlib
import io
import os


VERBOSE_ENV = "EDGEVIT_EXPORT_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


@contextlib.contextmanager
def silenced():
    """Python-level stdout and stderr swallowed for the duration (coremltools' import lines
    "Failed to load _MLModelProxy", converter chatter), unless verbose."""
    if verbose():
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def quiet_native():
    """Point fd 2 at /dev/null for the duration (a no-op where fd 2 cannot be duplicated, or verbose)."""
    if verbose():
        yield
        return
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)
