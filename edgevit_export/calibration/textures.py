"""A second drawn domain, harder on int8 than :mod:`.shapes`: textures told apart by hue in small steps.

Every image is one patch of a texture (stripes at any angle, a checkerboard or a dot lattice, at
any period and phase) on a near-grey background gradient. The texture alternates between a
neutral grey and a coloured ink, and the ten classes are the ink's hue: ten adjacent 36° bins of
the colour wheel (class ``hNN`` has hue in [36·NN − 18°, 36·NN + 18°), drawn uniformly, so many
images lie close to a neighbouring class). Half the inks are faint — a few levels of chroma next
to full-contrast luminance edges, a cue that per-tensor int8 activation scales resolve coarsely.
Everything else is nuisance: the pattern, the ink's saturation and value, the grey's level, the
background's level, faint tint and gradient, the patch's position, size and soft edge, a global
colour cast of a few percent, blur and pixel noise. Classes differ by a fine, quantitative cue rather than in
kind, so the small perturbations of int8 flip more predictions than on the shapes.

Same interface as :mod:`.shapes`: :data:`CLASSES` (sorted) and :func:`draw`, fully determined by
(seed, class, index); :func:`.shapes.write_shapes` and friends take ``domain="textures"``.
"""

from __future__ import annotations

import colorsys
import math
import random

import numpy as np
from PIL import Image

STEP = 36.0       # degrees of hue between class centres; bins are adjacent (no gap)
FAINT = 0.5       # share of images whose ink is faint (saturation 0.04–0.14)

CLASSES: tuple[str, ...] = tuple(f"h{k:02d}" for k in range(10))   # h00 (red) … h09, sorted


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), np.float32) * 255.0


def _pattern(kind: str, xx: np.ndarray, yy: np.ndarray, period: float, rng: random.Random) -> np.ndarray:
    """Ink coverage in [0, 1] over the image."""
    a = rng.uniform(0, math.pi)
    u = (xx * math.cos(a) + yy * math.sin(a)) / period + rng.uniform(0, 1)
    v = (-xx * math.sin(a) + yy * math.cos(a)) / period + rng.uniform(0, 1)
    if kind == "stripes":
        return 0.5 + 0.5 * np.tanh(3.0 * np.cos(2 * math.pi * u))
    if kind == "checker":
        return 0.5 + 0.5 * np.tanh(3.0 * np.sin(2 * math.pi * u) * np.sin(2 * math.pi * v))
    r = rng.uniform(0.2, 0.35)   # dots
    d = np.sqrt((u - np.round(u)) ** 2 + (v - np.round(v)) ** 2)
    return np.clip((r - d) * period, 0.0, 1.0)


def draw(cls: str, size: int = 72, seed: int = 0, index: int = 0) -> Image.Image:
    """One image of class ``cls``, determined by (seed, cls, index)."""
    if cls not in CLASSES:
        raise ValueError(f"unknown texture class {cls!r}; one of {', '.join(CLASSES)}")
    rng = random.Random(f"textures/{seed}/{cls}/{index}")
    hue = CLASSES.index(cls) * STEP + rng.uniform(-STEP / 2, STEP / 2)

    t = np.arange(size, dtype=np.float32)
    yy, xx = np.meshgrid(t, t, indexing="ij")

    # background: a grey gradient, tinted no more than the faintest ink
    level = rng.uniform(0.25, 0.85)
    bg = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.04), level)
    bg2 = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.04), float(np.clip(level + rng.uniform(-0.2, 0.2), 0.1, 1)))
    ga = rng.uniform(0, 2 * math.pi)
    ramp = math.cos(ga) * xx + math.sin(ga) * yy
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = bg[None, None] * (1 - ramp[..., None]) + bg2[None, None] * ramp[..., None]

    # the texture: a neutral grey and the class's ink; half the inks are faint (a few levels of
    # chroma, next to full-contrast luminance edges: what per-tensor int8 scales resolve worst)
    if rng.random() < FAINT:
        ink = _hsv(hue, rng.uniform(0.04, 0.14), rng.uniform(0.5, 1.0))
    else:
        ink = _hsv(hue, rng.uniform(0.3, 1.0), rng.uniform(0.4, 1.0))
    grey = np.full(3, rng.uniform(0.1, 0.9) * 255.0, np.float32)
    kind = rng.choice(("stripes", "checker", "dots"))
    g = _pattern(kind, xx, yy, size * rng.uniform(0.08, 0.18), rng)[..., None]
    tex = grey[None, None] * (1 - g) + ink[None, None] * g

    # a round patch with a soft edge, inside the central 80 % (a center crop never cuts it)
    inner = 0.8 * size
    r = inner / 2 * rng.uniform(0.5, 1.0)
    slack = inner / 2 - r
    cx = size / 2 + rng.uniform(-slack, slack)
    cy = size / 2 + rng.uniform(-slack, slack)
    soft = max(1.0, r * rng.uniform(0.08, 0.3))
    mask = np.clip((r - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)) / soft, 0.0, 1.0)[..., None]
    img = img * (1 - mask) + tex * mask

    # a global colour cast of a few percent per channel
    img = img * np.array([1.0 + rng.uniform(-0.03, 0.03) for _ in range(3)], np.float32)

    out = Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")
    from .shapes import blur_and_noise   # shapes imports this module for its DOMAINS table

    return blur_and_noise(out, rng, size, 0.8, 12.0)
