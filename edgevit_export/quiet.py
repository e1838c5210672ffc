"""Silencing what native runtimes write straight to file descriptor 2 (cpuinfo probing, delegate
banners, absl's "log messages before InitializeLog" line): Python's ``redirect_stderr`` does not
reach them."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def quiet_native():
    """Point fd 2 at /dev/null for the duration (a no-op where fd 2 cannot be duplicated)."""
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
