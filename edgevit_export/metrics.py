"""How close two sets of outputs are, row by row (one row per sample): cosine similarity, top-1
agreement, signal-to-quantisation-noise ratio. Inputs are (N, D) arrays; figures are float64."""

from __future__ import annotations

import math

import numpy as np


def rows(x: np.ndarray) -> np.ndarray:
    """(N, …) → (N, D) float64: one flat row per sample."""
    return np.asarray(x).reshape(len(x), -1).astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two (N, D) arrays, shape (N,)."""
    a, b = rows(a), rows(b)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share (0–1) of rows whose argmax is the same in ``a`` and ``b``; 0 for no rows."""
    if not len(a):
        return 0.0
    return float((rows(a).argmax(1) == rows(b).argmax(1)).mean())


def db(signal: float, noise: float) -> float:
    """10·log10(signal / noise); infinite without noise."""
    if noise <= 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    """SQNR of ``x`` against ``ref`` in dB: Σ ref² over Σ (ref − x)², over all elements."""
    ref = np.asarray(ref, np.float64)
    return db(float((ref ** 2).sum()), float(((ref - np.asarray(x, np.float64)) ** 2).sum()))
