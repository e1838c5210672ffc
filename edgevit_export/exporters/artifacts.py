"""Where artifacts go and how they get there: output paths, atomic writes, hashes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError


def res_tag(res: tuple[int, int]) -> str:
    return str(res[0]) if res[0] == res[1] else f"{res[0]}x{res[1]}"


def prepare_out_dir(out: str | Path) -> Path:
    """check_out_dir, then create the directory."""
    d = check_out_dir(out)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {d}: {e.strerror}; pass a writable --out") from None
    return d


def check_out_dir(out: str | Path) -> Path:
    """Whether OUT is, or can be created as, a writable directory, without creating anything: an
    export that then fails on bad input (a checkpoint that does not fit, say) leaves no empty
    directory behind. staging() creates the directory when there is something to write."""
    d = Path(out).expanduser()
    if d.exists():
        if not d.is_dir():
            raise OutputError(f"--out {d} exists and is not a directory; pass a directory")
        if not os.access(d, os.W_OK):
            raise OutputError(f"output directory {d} is not writable; pass a writable --out")
        return d
    parent = d.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        why = "not a directory" if not parent.is_dir() else "not writable"
        raise OutputError(f"cannot create output directory {d}: {parent} is {why}; pass a writable --out")
    return d


def check_free(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise OutputError(f"{existing[0]} already exists; pass --force to replace it")


@contextmanager
def staging(out_dir: Path):
    """A temporary directory next to the final artifacts (same filesystem, so moves are atomic
    renames); removed on the way out whatever happens. Creates ``out_dir`` if needed, and removes
    it again if it was created here and nothing was written to it."""
    created = not Path(out_dir).exists()
    prepare_out_dir(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".edgevit-tmp-", dir=out_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(Path(out_dir).iterdir()):
            Path(out_dir).rmdir()


def commit(staged: Path, final: Path) -> None:
    """Move a staged file or directory into place, replacing what was there."""
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)


def sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_bytes(path: Path) -> int:
    """Size of a file, or the total size of a directory's files (an .mlpackage)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
