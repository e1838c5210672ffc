"""Class-name files (``--labels``): one class name per line, in the model's class order."""

from __future__ import annotations

from pathlib import Path

from .errors import DataError


def read_labels(path: str | Path, flag: str = "--labels") -> list[str]:
    """The non-empty, stripped lines of a UTF-8 file; each name once. A file that is missing,
    unreadable, empty or repeats a name raises :class:`DataError` (an EdgeExportError) naming ``flag``."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "not found" if not p.exists() else "is not a regular file"
        raise DataError(f"{flag} file {what}: {p}; give a text file with one class name per line")
    try:
        names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{flag} file {p} is not UTF-8 text; give one class name per line") from None
    except OSError as e:
        raise DataError(f"cannot read {flag} file {p} ({type(e).__name__}); "
                        "give UTF-8 text, one class name per line") from None
    if not names:
        raise DataError(f"{flag} file {p} is empty; give one class name per line")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{flag} file {p} lists {dup[0]!r} more than once; each class once, in the model's order")
    return names
