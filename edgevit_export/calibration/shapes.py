"""A procedurally drawn, labelled image set: honest data for quantization tests and demos.

There are no ImageNet weights or images here, and a random-init model's accuracy means nothing.
So we draw our own classification problem: ten classes of shapes and textures, each image with
its own colours, position, scale, rotation, background gradient and pixel noise, drawn with
Pillow and fully determined by (seed, class, index). :func:`write_shapes` writes it as an
ImageNet-style folder (one sub-folder per class), which every reader in this package takes.

Class names are sorted, so "sorted folder order" (what :mod:`.data` uses by default) is also
the order of :data:`CLASSES` and of the trained model's head.

:data:`DOMAINS` names the drawn domains (each a module with ``CLASSES`` and ``draw``): this one,
``"shapes"``, and ``"textures"`` (:mod:`.textures`: ten adjacent hue bins of a textured patch,
half of them faint, a fine-grained second domain for int8); the writers here and
:func:`.train.train_shapes` take ``domain=``.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..progress import Callback, emit
from . import textures

CLASSES: tuple[str, ...] = tuple(sorted((
    "circle", "square", "triangle", "star", "cross", "ring", "hstripes", "vstripes", "checker", "dots")))


@dataclass
class ShapesSet:
    root: Path
    classes: tuple[str, ...]
    per_class: int
    size: int
    seed: int
    domain: str = "shapes"

    @property
    def count(self) -> int:
        return self.per_class * len(self.classes)


def _luma(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
    """Background (two ends of a gradient) and foreground colours with visible contrast."""
    while True:
        bg = tuple(rng.randrange(256) for _ in range(3))
        fg = tuple(rng.randrange(256) for _ in range(3))
        if abs(_luma(bg) - _luma(fg)) > 60:
            break
    bg2 = tuple(int(min(255, max(0, v + rng.randint(-40, 40)))) for v in bg)
    return bg, bg2, fg


def _background(size: int, bg, bg2, rng: random.Random) -> Image.Image:
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    a, b = np.array(bg, np.float32), np.array(bg2, np.float32)
    img = a[None, None, :] * (1 - ramp[..., None]) + b[None, None, :] * ramp[..., None]
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def _rot(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _texture(kind: str, size: int, fg, period: float, rng: random.Random) -> Image.Image:
    """A full-size RGBA layer with the texture drawn in fg on transparent."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    p = max(3.0, period)
    off = rng.uniform(0, p)
    fill = (*fg, 255)
    if kind == "hstripes":
        y = -p + off
        while y < size + p:
            d.rectangle([-size, y, 2 * size, y + p / 2], fill=fill)
            y += p
    elif kind == "vstripes":
        x = -p + off
        while x < size + p:
            d.rectangle([x, -size, x + p / 2, 2 * size], fill=fill)
            x += p
    elif kind == "checker":
        n = int(size / p) + 3
        for i in range(-1, n):
            for j in range(-1, n):
                if (i + j) % 2 == 0:
                    x, y = i * p + off, j * p + off
                    d.rectangle([x, y, x + p - 1, y + p - 1], fill=fill)
    elif kind == "dots":
        r = p * rng.uniform(0.2, 0.3)
        n = int(size / p) + 3
        for i in range(-1, n):
            for j in range(-1, n):
                x, y = i * p + off + p / 2, j * p + off + p / 2
                d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    return layer


def draw(cls: str, size: int = 72, seed: int = 0, index: int = 0) -> Image.Image:
    """One image of class ``cls``, determined by (seed, cls, index)."""
    if cls not in CLASSES:
        raise ValueError(f"unknown shape class {cls!r}; one of {', '.join(CLASSES)}")
    rng = random.Random(f"{seed}/{cls}/{index}")
    bg, bg2, fg = _colours(rng)
    img = _background(size, bg, bg2, rng)
    d = ImageDraw.Draw(img)
    # Keep the object inside the central 80 % so a center crop at crop_pct 0.875 never cuts it.
    inner = 0.8 * size
    r = inner / 2 * rng.uniform(0.45, 0.85)
    slack = inner / 2 - r
    cx = size / 2 + rng.uniform(-slack, slack)
    cy = size / 2 + rng.uniform(-slack, slack)
    angle = rng.uniform(0, 2 * math.pi)

    if cls == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif cls == "ring":
        w = max(2, int(r * rng.uniform(0.22, 0.4)))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=w)
    elif cls == "square":
        h = r / math.sqrt(2) * 1.15
        d.polygon(_rot([(-h, -h), (h, -h), (h, h), (-h, h)], cx, cy, angle), fill=fg)
    elif cls == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        d.polygon(_rot(pts, cx, cy, angle), fill=fg)
    elif cls == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.42
            a = k * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        d.polygon(_rot(pts, cx, cy, angle), fill=fg)
    elif cls == "cross":
        t = r * rng.uniform(0.22, 0.32)
        arm_a = [(-r, -t), (r, -t), (r, t), (-r, t)]
        arm_b = [(-t, -r), (t, -r), (t, r), (-t, r)]
        a = rng.uniform(-0.35, 0.35)
        d.polygon(_rot(arm_a, cx, cy, a), fill=fg)
        d.polygon(_rot(arm_b, cx, cy, a), fill=fg)
    else:  # textures inside a patch
        period = size * rng.uniform(0.09, 0.16)
        layer = _texture(cls, size, fg, period, rng)
        if cls in ("hstripes", "vstripes"):
            layer = layer.rotate(math.degrees(rng.uniform(-0.25, 0.25)), resample=Image.BILINEAR,
                                 center=(cx, cy))
        mask = Image.new("L", (size, size), 0)
        md = ImageDraw.Draw(mask)
        hw = r * rng.uniform(1.0, 1.25)
        hh = r * rng.uniform(1.0, 1.25)
        md.rectangle([cx - hw, cy - hh, cx + hw, cy + hh], fill=255)
        alpha = Image.fromarray((np.asarray(layer)[..., 3].astype(np.float32) *
                                 (np.asarray(mask, np.float32) / 255)).astype(np.uint8), "L")
        img.paste(layer.convert("RGB"), (0, 0), alpha)

    return blur_and_noise(img, rng, size, 0.9, 14.0)


def blur_and_noise(img: Image.Image, rng: random.Random, size: int, blur: float, sigma_max: float) -> Image.Image:
    """The camera nuisance every drawn domain ends with: a light blur on 30% of images (radius
    0.3–``blur``), then Gaussian pixel noise of a random sigma up to ``sigma_max``."""
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, blur)))
    sigma = rng.uniform(0.0, sigma_max)
    if sigma > 0.5:
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, sigma, (size, size, 3))
        img = Image.fromarray((np.asarray(img, np.float32) + noise).clip(0, 255).astype(np.uint8), "RGB")
    return img


def domain_module(domain: str):
    """The module (``CLASSES``, ``draw``) of a drawn domain: one of :data:`DOMAINS`."""
    try:
        return DOMAINS[domain]
    except KeyError:
        raise ValueError(f"unknown drawn domain {domain!r}; one of {', '.join(DOMAINS)}") from None


def write_shapes(out: str | Path, per_class: int, *, size: int = 72, seed: int = 0, fmt: str = "png",
                 classes: tuple[str, ...] | None = None, domain: str = "shapes",
                 progress: Callback | None = None) -> ShapesSet:
    """Write ``per_class`` images of each class to ``out/<class>/<class>_NNNNN.<fmt>``.

    Different seeds give disjoint draws (use one seed for train, another for a held-out test set).
    ``domain`` picks the drawing (:data:`DOMAINS`); ``classes`` defaults to all of its classes.
    """
    mod = domain_module(domain)
    classes = mod.CLASSES if classes is None else classes
    root = Path(out)
    total = per_class * len(classes)
    done = 0
    for cls in classes:
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mod.draw(cls, size, seed, i).save(d / f"{cls}_{i:05d}.{fmt}")
            done += 1
            if done % 50 == 0 or done == total:
                emit(progress, "draw shapes" if domain == "shapes" else f"draw {domain}", done, total)
    return ShapesSet(root, tuple(classes), per_class, size, seed, domain)


def shapes_arrays(per_class: int, *, size: int = 72, seed: int = 0,
                  classes: tuple[str, ...] | None = None,
                  domain: str = "shapes") -> tuple[np.ndarray, np.ndarray]:
    """The same images in memory: (N, size, size, 3) uint8 and (N,) int64 labels."""
    mod = domain_module(domain)
    classes = mod.CLASSES if classes is None else classes
    imgs, labels = [], []
    for k, cls in enumerate(classes):
        for i in range(per_class):
            imgs.append(np.asarray(mod.draw(cls, size, seed, i)))
            labels.append(k)
    return np.stack(imgs), np.asarray(labels, np.int64)


# The drawn domains, by name: each a module with a sorted ``CLASSES`` and ``draw(cls, size, seed, index)``.
DOMAINS = {"shapes": sys.modules[__name__], "textures": textures}
