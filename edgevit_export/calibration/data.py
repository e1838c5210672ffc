"""Image data for calibration and evaluation: folder readers, the model's preprocessing, synthetic.

- :func:`scan_images` lists every image under a folder (any nesting; jpg/jpeg/png/webp/bmp),
  counting the non-image files it skips. Bad folders (missing, not a folder, unreadable, no
  images) raise :class:`~edgevit_export.errors.DataError` with a message that says what to do.
- :func:`scan_labelled` reads an ImageNet-style labelled folder: one sub-folder per class (images
  anywhere below it), class order by sorted folder name or by a ``--labels`` file.
- :class:`Preprocess` is the model's own evaluation transform: resize the shorter side to
  ``res / crop_pct`` (crop_pct 0.875, as at 224 → 256), center-crop ``res``, scale to [0, 1],
  normalise with the model's mean/std (or leave raw pixels for graphs that normalise inside).
- :class:`ImageSource` iterates preprocessed images, skipping corrupt files and naming them;
  :class:`SyntheticSource` draws images procedurally (for smoke runs only).
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError, first_line
from ..labels import read_labels

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CROP_PCT = 0.875


# --- preprocessing ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocess:
    """Resize (shorter side to size / crop_pct, bicubic) → center crop → [0, 1] → (x - mean) / std.

    With ``raw_scale`` set the output is raw pixels in [0, raw_scale] (for graphs whose first op
    normalises, e.g. after the ``normalize_input`` pass) and mean/std are not applied.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = CROP_PCT
    raw_scale: float | None = None

    def describe(self) -> str:
        h, w = self.size
        norm = (f"raw pixels 0-{self.raw_scale:g}" if self.raw_scale is not None
                else f"mean {tuple(round(m, 3) for m in self.mean)} std {tuple(round(s, 3) for s in self.std)}")
        return (f"resize shorter side to {round(min(h, w) / self.crop_pct)} (crop_pct {self.crop_pct:g}), "
                f"center-crop {h}x{w}, {norm}")

    def image(self, img) -> np.ndarray:
        """A PIL image → (3, H, W) float32."""
        from PIL import Image

        img = img.convert("RGB")
        h, w = self.size
        iw, ih = img.size
        scale = max(h / self.crop_pct / ih, w / self.crop_pct / iw)
        nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
        if (nw, nh) != (iw, ih):
            img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - w) // 2, (nh - h) // 2
        img = img.crop((left, top, left + w, top + h))
        return self.array(np.asarray(img))

    def array(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 pixels (already at size) → (3, H, W) float32."""
        x = pixels.astype(np.float32).transpose(2, 0, 1)
        if self.raw_scale is not None:
            return np.ascontiguousarray(x * (self.raw_scale / 255.0))
        x = x / 255.0
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return np.ascontiguousarray((x - mean) / std)


# --- folders ---------------------------------------------------------------------------------

@dataclass
class ImageScan:
    root: Path
    files: list[Path]
    non_images: int = 0
    unreadable_dirs: list[str] = field(default_factory=list)


def _check_dir(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"{what} folder not found: {root}; pass a folder of images")
    if not root.is_dir():
        raise DataError(f"{what} path {root} is not a folder; pass a folder of images "
                        f"(jpg/png/webp/bmp, any nesting)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"cannot read {what} folder {root} (permission denied); fix its permissions")
    try:
        with os.scandir(root):
            pass
    except OSError as e:
        raise DataError(f"cannot read {what} folder {root} ({e.strerror}); fix its permissions") from None


def _walk(root: Path, unreadable: list[str]) -> Iterator[Path]:
    def onerror(e: OSError):
        unreadable.append(str(e.filename))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            yield Path(dirpath) / f


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def scan_images(root: str | Path, what: str = "calibration") -> ImageScan:
    """Every image file under ``root`` (sorted, any nesting); non-image files are counted."""
    root = Path(root).expanduser()
    _check_dir(root, what)
    unreadable: list[str] = []
    files, other = [], 0
    for p in _walk(root, unreadable):
        if _is_image_name(p):
            files.append(p)
        else:
            other += 1
    if not files:
        found = f" (found {other} non-image files)" if other else " (it is empty)"
        extra = f"; {len(unreadable)} sub-folders could not be read" if unreadable else ""
        raise DataError(f"no images in {what} folder {root}{found}{extra}; "
                        f"pass a folder with {'/'.join(e[1:] for e in IMAGE_EXTS)} images")
    return ImageScan(root, files, other, unreadable)


@dataclass
class LabelledSet:
    root: Path
    classes: list[str]                   # index → class (folder) name
    files: list[Path]
    labels: list[int]
    non_images: int = 0
    empty_classes: list[str] = field(default_factory=list)
    unreadable_dirs: list[str] = field(default_factory=list)
    labels_file: Path | None = None

    @property
    def per_class(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for y in self.labels:
            counts[self.classes[y]] += 1
        return counts


def is_labelled(root: str | Path) -> bool:
    """A labelled folder has class sub-folders holding images and no loose images at its top."""
    root = Path(root).expanduser()
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except OSError:
        return False
    if any(e.is_file() and _is_image_name(Path(e.name)) for e in entries):
        return False
    return any(e.is_dir() and not e.name.startswith(".") for e in entries)


def scan_labelled(root: str | Path, labels_file: str | Path | None = None, what: str = "--eval") -> LabelledSet:
    """An ImageNet-style folder: ``root/<class>/**/<image>``; class index = position of the
    folder name in sorted order, or in ``labels_file`` when given."""
    root = Path(root).expanduser()
    _check_dir(root, f"{what}")
    with os.scandir(root) as it:
        entries = list(it)
    loose = [e.name for e in entries if e.is_file() and _is_image_name(Path(e.name))]
    dirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if loose:
        raise DataError(f"{what} folder {root} has images at its top level ({loose[0]}…); a labelled folder has "
                        "one sub-folder per class with the images inside")
    if not dirs:
        raise DataError(f"{what} folder {root} has no class sub-folders; a labelled folder has one sub-folder "
                        "per class (ImageNet-style)")
    classes = read_labels(labels_file) if labels_file is not None else dirs
    index = {c: i for i, c in enumerate(classes)}
    unknown = [d for d in dirs if d not in index]
    if unknown:
        raise DataError(f"{what} folder {root} has class folder {unknown[0]!r} that is not in --labels "
                        f"{labels_file} ({len(unknown)} such folders); make the labels file list every class")
    unreadable: list[str] = []
    files, labels, other, empty = [], [], 0, []
    for d in dirs:
        n = 0
        for p in _walk(root / d, unreadable):
            if _is_image_name(p):
                files.append(p)
                labels.append(index[d])
                n += 1
            else:
                other += 1
        if n == 0:
            empty.append(d)
    if not files:
        raise DataError(f"no images in {what} folder {root} (found {other} non-image files in {len(dirs)} "
                        "class folders); put jpg/png/webp/bmp images in the class folders")
    return LabelledSet(root, classes, files, labels, other, empty, unreadable,
                       Path(labels_file) if labels_file is not None else None)


def check_classes(ds: LabelledSet, num_classes: int, model_desc: str, what: str = "--eval") -> None:
    """The folder's classes must match the model's head, one to one."""
    if len(ds.classes) != num_classes:
        src = f"--labels {ds.labels_file} lists" if ds.labels_file else f"{what} folder {ds.root} has"
        hint = ("pass --labels FILE with the model's classes in order (folder names, one per line)"
                if ds.labels_file is None else "give a labels file with exactly one line per model class")
        raise DataError(f"{src} {len(ds.classes)} classes but {model_desc} predicts {num_classes}; {hint}")


def files_digest(files: list[Path], root: Path | None) -> str:
    """sha256 of the list of files used (relative paths, in use order)."""
    h = hashlib.sha256()
    for f in files:
        name = str(f.relative_to(root)) if root is not None and f.is_relative_to(root) else str(f)
        h.update(name.encode())
        h.update(b"\n")
    return h.hexdigest()


# --- sources ---------------------------------------------------------------------------------

class CorruptImage(Exception):
    pass


def load_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        msg = first_line(e)
        raise CorruptImage(msg[:120]) from None


@dataclass
class Item:
    key: str              # file path (or synthetic id)
    x: np.ndarray         # (3, H, W) float32, preprocessed
    label: int | None


class ImageSource:
    """Preprocessed images from files, in a fixed order; corrupt files are skipped and recorded
    in ``skipped`` as (path, reason). ``limit`` stops after that many good images."""

    synthetic = False

    def __init__(self, files: list[Path], preprocess: Preprocess, labels: list[int] | None = None,
                 root: Path | None = None, limit: int | None = None):
        self.files = list(files)
        self.labels = labels
        self.preprocess = preprocess
        self.root = root
        self.limit = limit
        self.skipped: list[tuple[str, str]] = []
        self.used: list[Path] = []

    def __len__(self) -> int:
        return min(len(self.files), self.limit) if self.limit is not None else len(self.files)

    def __iter__(self) -> Iterator[Item]:
        self.skipped, self.used = [], []
        for i, f in enumerate(self.files):
            if self.limit is not None and len(self.used) >= self.limit:
                break
            try:
                img = load_image(f)
            except CorruptImage as e:
                self.skipped.append((str(f), str(e)))
                continue
            self.used.append(f)
            yield Item(str(f), self.preprocess.image(img), self.labels[i] if self.labels is not None else None)

    def digest(self) -> str:
        return files_digest(self.used, self.root)


class SyntheticSource:
    """Procedurally drawn images (the shapes of :mod:`.shapes`) through the model's preprocessing.

    For smoke runs of the pipeline only: calibration ranges from drawn shapes are not those of
    real photographs, so an artifact calibrated on them is not for shipping.
    """

    synthetic = True

    def __init__(self, count: int, preprocess: Preprocess, seed: int = 0):
        self.count = count
        self.preprocess = preprocess
        self.seed = seed
        self.skipped: list[tuple[str, str]] = []
        self.used: list[str] = []

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Item]:
        from .shapes import CLASSES, draw

        self.used = []
        h, w = self.preprocess.size
        side = round(max(h, w) / self.preprocess.crop_pct)
        for i in range(self.count):
            cls = CLASSES[i % len(CLASSES)]
            img = draw(cls, side, self.seed, i // len(CLASSES))
            self.used.append(f"synthetic:{self.seed}:{cls}:{i // len(CLASSES)}")
            yield Item(self.used[-1], self.preprocess.image(img), None)

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.used).encode()).hexdigest()


def spread(files: list[Path], seed: int = 0) -> list[Path]:
    """A seeded shuffle, so that the first N files of a class-sorted folder span the classes."""
    out = list(files)
    random.Random(seed).shuffle(out)
    return out
