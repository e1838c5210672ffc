"""Checks that run after a backend: numeric parity against PyTorch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class Parity:
    """How close an artifact's outputs are to the PyTorch model's on the same seeded inputs."""

    max_abs: float
    max_rel: float          # max |a - b| / max |b|: relative to the output's scale
    cosine: float           # lowest per-sample cosine similarity
    top1_agree: float       # share of samples whose argmax agrees
    samples: int
    tolerance: float
    reference: str = "pytorch fp32"

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance

    def as_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def compare(outputs: list[np.ndarray], references: list[np.ndarray], tolerance: float,
            reference: str = "pytorch fp32") -> Parity:
    a = np.concatenate([o.reshape(o.shape[0], -1) for o in outputs]).astype(np.float64)
    b = np.concatenate([r.reshape(r.shape[0], -1) for r in references]).astype(np.float64)
    diff = np.abs(a - b)
    scale = float(np.abs(b).max()) or 1.0
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return Parity(max_abs=float(diff.max()), max_rel=float(diff.max() / scale), cosine=float(cos.min()),
                  top1_agree=float((a.argmax(1) == b.argmax(1)).mean()), samples=int(a.shape[0]),
                  tolerance=tolerance, reference=reference)


def seeded_inputs(shape: tuple[int, ...], count: int, raw_scale: float | None, seed: int = 1234) -> list[torch.Tensor]:
    """``count`` seeded inputs: normalised-looking N(0, 1) tensors, or raw pixels in [0, raw_scale]."""
    g = torch.Generator().manual_seed(seed)
    if raw_scale is None:
        return [torch.randn(shape, generator=g) for _ in range(count)]
    return [torch.rand(shape, generator=g) * raw_scale for _ in range(count)]
