"""Class-name files (``--labels``): one class name per line, in the model's class order."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import DataError


def read_labels(path: str | Path, flag: str = "--labels", unique: bool = True) -> list[str]:
    """The non-empty, stripped lines of a UTF-8 file; each name once unless ``unique`` is off (a file
    an export wrote: ImageNet-1k itself names 'crane' twice). A file that is missing, unreadable,
    empty or repeats a name raises :class:`DataError` (an EdgeExportError) naming ``flag``."""
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
    dup = sorted({n for n in names if names.count(n) > 1}) if unique else []
    if dup:
        raise DataError(f"{flag} file {p} lists {dup[0]!r} more than once; each class once, in the model's order")
    return names


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, in the class-index order of timm's and the papers' heads."""
    return resources.files("edgevit_export").joinpath("data/imagenet1k_classes.txt").read_text().splitlines()
