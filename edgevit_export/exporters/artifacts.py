"""Where artifacts go and how they get there: output paths, atomic writes, hashes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import signal
import tempfile
import threading
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
        if not _can_write(d):
            raise OutputError(f"output directory {d} is not writable; pass a writable --out")
        return d
    parent = d.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not _can_write(parent):
        why = "not a directory" if not parent.is_dir() else "not writable"
        raise OutputError(f"cannot create output directory {d}: {parent} is {why}; pass a writable --out")
    return d


def _can_write(d: Path) -> bool:
    """By trying (a directory made and removed at once): os.access says yes to root on read-only
    mounts and pseudo-filesystems, where the export would fail only after all its work."""
    if not os.access(d, os.W_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edgevit-probe-", dir=d))
    except OSError:
        return False
    return True


def check_free(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise OutputError(f"{existing[0]} already exists; pass --force to replace it")


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def disk_full(e: BaseException | None) -> str | None:
    """Why a write ran out of space, if that is what ``e`` is: converters wrap the OSError of a
    failed write in their own exceptions, so the chain of causes is walked; coremltools' weight
    writer (C++) says only "[MIL FileWriter]: Unknown error occurred while writing data"."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e.strerror
        if isinstance(e, RuntimeError) and "FileWriter" in str(e):
            return "coremltools could not write the weights"
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


@contextmanager
def staging(out_dir: Path):
    """A temporary directory next to the final artifacts (same filesystem, so moves are atomic
    renames); removed on the way out whatever happens (an error, Ctrl-C). Creates ``out_dir`` if
    needed, and removes it again (with the parents made for it) if it was created here and nothing
    was written to it. A write that runs out of space becomes one line (OutputError) instead of the
    converter's traceback."""
    made = _missing_dirs(Path(out_dir))
    prepare_out_dir(out_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".edgevit-tmp-", dir=out_dir))
    except OSError as e:
        raise OutputError(f"cannot write to {out_dir}: {e.strerror}; pass a writable --out") from None
    try:
        yield tmp
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise
        raise OutputError(f"no space left writing to {out_dir} ({full}); nothing was written — free some "
                          f"space (there and in {tempfile.gettempdir()}) or pass another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:                       # innermost first; stops at the first that holds something
            try:
                d.rmdir()
            except OSError:
                break


def _missing_dirs(d: Path) -> list[Path]:
    """``d`` and those of its parents that do not exist yet, innermost first."""
    out = []
    d = d.expanduser().absolute()
    while not d.exists() and d != d.parent:
        out.append(d)
        d = d.parent
    return out


@contextmanager
def _deferred_sigint():
    """Ctrl-C waits until the block is done (the main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


@contextmanager
def _locked(out_dir: Path):
    """An exclusive lock on the output directory itself (flock on its descriptor: no lock file is
    left behind), held while a set of files is put in place."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def commit_all(moves: list[tuple[Path, Path]], force: bool, stale: tuple[Path, ...] = ()) -> None:
    """Put a set of staged files in place as one step: the artifact, then its golden file, the
    manifest last. Two exports to the same place take turns (a lock on the directory), so a
    manifest always describes the artifact beside it; Ctrl-C waits until the set is complete; and
    without ``force`` a file that appeared meanwhile (another export got there first) is never
    replaced: the export is refused before anything moves. ``stale``: files of the old set that the
    new one does not have (a golden file beside an artifact exported without the check), removed."""
    from ..progress import raise_if_interrupted

    raise_if_interrupted()      # a Ctrl-C a converter swallowed: nothing moves
    out_dirs = {final.parent for _, final in moves}
    assert len(out_dirs) == 1, out_dirs
    with _deferred_sigint(), _locked(out_dirs.pop()):
        if not force:
            check_free([final for _, final in moves], force)
        for staged, final in moves:
            commit(staged, final)
        for old in stale:
            old.unlink(missing_ok=True)


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
