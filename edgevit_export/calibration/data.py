"""Image data for calibration and evaluation: folder readers, the model's preprocessing, synthetic.

- :func:`scan_images` lists every image under a folder (any nesting; jpg/jpeg/png/webp/bmp),
  counting the non-image files it skips. Bad folders (missing, not a folder, unreadable, no
  images) raise :class:`~edgevit_export.errors.DataError` with a message that says what to do.
- :func:`scan_labelled` reads an ImageNet-style labelled folder: one sub-folder per class (images
  anywhere below it), class order by sorted folder name or by a ``--labels`` file.
- :class:`Preprocess` is the model's own evaluation transform (``ModelInfo.crop_pct`` /
  ``interpolation`` / ``mean`` / ``std``, from its timm or official eval config): resize the shorter
  side to ``floor(res / crop_pct)`` (0.875: 224 → 256) with that PIL filter, center-crop ``res``,
  scale to [0, 1], normalise with mean/std (or leave raw pixels for graphs that normalise inside).
  :class:`PreprocessOverrides` holds what ``--crop-pct``/``--interpolation``/``--mean``/``--std`` change.
- :class:`ImageSource` iterates preprocessed images, skipping corrupt files and naming them;
  :class:`SyntheticSource` draws images procedurally (for smoke runs only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError, EdgeExportError, UnknownModelError, first_line
from ..labels import read_labels
from ..registry import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CROP_PCT = 0.875


# --- preprocessing ---------------------------------------------------------------------------

# name → PIL resampling filter (Image.Resampling member names; PIL's values, fixed since Pillow 2)
PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
assert set(PIL_FILTERS) == set(INTERPOLATIONS)

OVERRIDE_HELP = {
    "crop_pct": "Eval crop fraction 0 < F ≤ 1: resize the shorter side to res / F, center-crop res (default: "
                "the model's, see 'info'; 1 = resize the shorter side to res, no margin: images already at "
                "the input size pass untouched).",
    "interpolation": "Resize filter: " + " | ".join(INTERPOLATIONS) + " (default: the model's).",
    "mean": "Normalisation mean R,G,B on the 0-1 pixel scale (default: the model's, ImageNet's).",
    "std": "Normalisation std R,G,B on the 0-1 pixel scale (default: the model's, ImageNet's).",
}


@dataclass(frozen=True)
class Preprocess:
    """Resize (shorter side to floor(size / crop_pct), ``interpolation``) → center crop ``size`` →
    [0, 1] → (x - mean) / std: timm's eval transform (``transforms_imagenet_eval``, crop_mode center).

    ``crop_pct`` 1 resizes the shorter side to the input size itself: a square image keeps all of
    its content, and an image already at the input size passes untouched (no resampling at all).
    With ``raw_scale`` set the output is raw pixels in [0, raw_scale] (for graphs whose first op
    normalises, e.g. after the ``normalize_input`` pass) and mean/std are not applied.
    ``overrides`` names what the user changed from the model's own transform (for the record).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = CROP_PCT
    raw_scale: float | None = None
    interpolation: str = "bicubic"
    overrides: tuple[str, ...] = ()

    @classmethod
    def of_model(cls, info, size: tuple[int, int], overrides: PreprocessOverrides | None = None) -> Preprocess:
        """A zoo model's own eval transform (its ``ModelInfo``) at ``size``, with ``overrides``."""
        pre = cls(tuple(size), tuple(info.mean), tuple(info.std), crop_pct=info.crop_pct,
                  interpolation=info.interpolation)
        return overrides.apply(pre) if overrides else pre

    @classmethod
    def from_manifest(cls, manifest: dict | None, size: tuple[int, int], raw_scale: float | None = None,
                      overrides: PreprocessOverrides | None = None) -> Preprocess:
        """The transform an artifact's manifest records ("preprocess", "normalization"). Manifests
        written before per-model preprocessing recorded a tool-wide 0.875 bicubic: for those, a zoo
        model's own values are used."""
        m = manifest or {}
        pp = m.get("preprocess") if isinstance(m.get("preprocess"), dict) else {}
        nm = m.get("normalization") if isinstance(m.get("normalization"), dict) else {}
        crop, interp = CROP_PCT, "bicubic"
        if "mean" not in pp and m.get("model"):     # an older manifest: the model's own, if it is a zoo model
            from ..registry import get_model_info

            try:
                info = get_model_info(str(m["model"]))
                pp = {"crop_pct": info.crop_pct, "interpolation": info.interpolation}
            except UnknownModelError:
                pass
        crop = _manifest_value(pp.get("crop_pct"), crop, lambda v: 0 < float(v) <= 1, float)
        interp = _manifest_value(pp.get("interpolation"), interp, lambda v: str(v) in PIL_FILTERS, str)
        mean = tuple(float(v) for v in nm.get("mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in nm.get("std", IMAGENET_STD))
        known = ("--crop-pct", "--interpolation", "--mean", "--std")    # what the export was told, kept on record
        recorded = pp.get("overrides") if isinstance(pp.get("overrides"), list) else []
        given = tuple(f for f in recorded if f in known)
        pre = cls(tuple(size), mean, std, crop_pct=crop, raw_scale=raw_scale, interpolation=interp, overrides=given)
        return overrides.apply(pre) if overrides else pre

    @property
    def cover(self) -> tuple[int, int]:
        """The (h, w) the image is resized to cover, aspect ratio kept, before the center crop
        (timm: ``math.floor(img_size / crop_pct)``)."""
        return tuple(max(1, math.floor(d / self.crop_pct + 1e-6)) for d in self.size)

    @property
    def resize_to(self) -> int:
        """The shorter side after resizing, for a square input."""
        return min(self.cover)

    def describe(self) -> str:
        h, w = self.size
        norm = (f"raw pixels 0-{self.raw_scale:g}" if self.raw_scale is not None
                else f"mean {tuple(round(m, 3) for m in self.mean)} std {tuple(round(s, 3) for s in self.std)}")
        given = f" (overridden: {', '.join(self.overrides)})" if self.overrides else ""
        return (f"resize shorter side to {self.resize_to} ({self.interpolation}, crop_pct {self.crop_pct:g}), "
                f"center-crop {h}x{w}, {norm}{given}")

    def as_dict(self) -> dict:
        """For manifests: what an app must do to an image before it feeds the artifact."""
        return {"resize": "shorter side to resize_shorter_to, aspect ratio kept", "resize_shorter_to": self.resize_to,
                "resize_to_cover": list(self.cover),
                "crop_pct": self.crop_pct, "interpolation": self.interpolation, "crop": "center",
                "size": list(self.size),
                "pixels": (f"raw 0-{self.raw_scale:g} (normalised inside the graph)" if self.raw_scale is not None
                           else "scaled to 0-1, then (x - mean) / std"),
                "mean": list(self.mean), "std": list(self.std), "overrides": list(self.overrides)}

    def image(self, img) -> np.ndarray:
        """A PIL image → (3, H, W) float32."""
        img = img.convert("RGB")
        h, w = self.size
        iw, ih = img.size
        th, tw = self.cover
        scale = max(th / ih, tw / iw)
        nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
        if (nw, nh) != (iw, ih):
            img = img.resize((nw, nh), PIL_FILTERS[self.interpolation])
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


def _manifest_value(v, default, ok, cast):
    try:
        return cast(v) if v is not None and ok(v) else default
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class PreprocessOverrides:
    """What the user said about the eval transform (``--crop-pct``, ``--interpolation``, ``--mean``,
    ``--std``); None keeps the model's (or the manifest's) own. Build with :meth:`parse`, which
    checks every value up front (bad value → EdgeExportError, one line)."""

    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @classmethod
    def parse(cls, crop_pct=None, interpolation=None, mean=None, std=None) -> PreprocessOverrides:
        """Values as the CLI gives them (strings: ``"0.9"``, ``"bilinear"``, ``"0.5,0.5,0.5"``) or as
        Python passes them (a float, a 3-sequence)."""
        return cls(_crop_pct(crop_pct), _interpolation(interpolation), _rgb("--mean", mean, zero_ok=True),
                   _rgb("--std", std, zero_ok=False))

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.crop_pct, self.interpolation, self.mean, self.std))

    @property
    def normalization(self) -> bool:
        """Whether mean or std was given."""
        return self.mean is not None or self.std is not None

    def flags(self) -> tuple[str, ...]:
        named = (("--crop-pct", self.crop_pct), ("--interpolation", self.interpolation), ("--mean", self.mean),
                 ("--std", self.std))
        return tuple(f for f, v in named if v is not None)

    def apply(self, pre: Preprocess) -> Preprocess:
        return dataclasses.replace(
            pre, crop_pct=pre.crop_pct if self.crop_pct is None else self.crop_pct,
            interpolation=self.interpolation or pre.interpolation,
            mean=pre.mean if self.mean is None else self.mean, std=pre.std if self.std is None else self.std,
            overrides=tuple(dict.fromkeys(pre.overrides + self.flags())))


def _crop_pct(v) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = math.nan
    if not (math.isfinite(f) and 0 < f <= 1):
        raise EdgeExportError(f"--crop-pct takes a fraction 0 < F ≤ 1 (e.g. 0.875: resize the shorter side to "
                              f"res / 0.875, center-crop res; 1: no margin), got '{v}'")
    return f


def _interpolation(v) -> str | None:
    if v is None:
        return None
    name = str(v).strip().lower()
    if name not in PIL_FILTERS:
        import difflib

        close = difflib.get_close_matches(name, INTERPOLATIONS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise EdgeExportError(f"unknown --interpolation '{v}'{hint}; use one of: {', '.join(INTERPOLATIONS)}")
    return name


def _rgb(flag: str, v, zero_ok: bool) -> tuple[float, float, float] | None:
    if v is None:
        return None
    parts = [p.strip() for p in v.split(",")] if isinstance(v, str) else list(v) if hasattr(v, "__iter__") else [v]
    try:
        vals = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        vals = ()
    shown = v if isinstance(v, str) else ",".join(str(p) for p in parts)
    example = "0.485,0.456,0.406" if zero_ok else "0.229,0.224,0.225"
    if len(vals) != 3 or not all(math.isfinite(x) for x in vals):
        raise EdgeExportError(f"{flag} takes three numbers R,G,B (e.g. {example}), got '{shown}'")
    low_ok = all(x >= 0 for x in vals) if zero_ok else all(x > 0 for x in vals)
    if not low_ok or any(x > 1 for x in vals):
        scale = " (values on the 0-255 scale: divide them by 255)" if any(x > 1 for x in vals) else ""
        rng = "0 ≤ each ≤ 1" if zero_ok else "0 < each ≤ 1"
        raise EdgeExportError(f"{flag} is on the 0-1 pixel scale, {rng}{scale}; got '{shown}'")
    return vals


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


from struct import error as struct_error  # noqa: E402  (Pillow raises it on some cut files)


MAX_PIXELS = 89_478_485   # Pillow's decompression-bomb limit (it only warns below twice this)


def load_image(path: Path):
    """Any image Pillow reads, as 8-bit RGB: CMYK, greyscale, palette and bilevel through Pillow's
    conversions; alpha dropped as timm's loader drops it (``convert("RGB")``); 16-bit and 32-bit
    greyscale scaled to 8 bits (Pillow's own conversion clips them to white). Files that are not
    images, truncated, or larger than ``MAX_PIXELS`` (a decompression bomb: a small file claiming
    enormous dimensions) raise CorruptImage, which the readers count as skipped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise CorruptImage(f"{w}x{h} pixels is beyond the {MAX_PIXELS:,}-pixel limit (a decompression bomb?)")
            im.load()
            if im.mode.startswith("I") or im.mode == "F":
                return _deep_to_rgb(im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            EOFError, struct_error) as e:
        msg = first_line(e)
        raise CorruptImage(msg[:120]) from None


def _deep_to_rgb(im):
    """16-bit ('I;16*', or 'I' holding 0-65535) and float ('F', 0-1 or 0-255) greyscale → 8-bit RGB."""
    from PIL import Image

    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
    elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 257.0
    g = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    return Image.fromarray(g, "L").convert("RGB")


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
