"""The generic check: an artifact's Runner against PyTorch on seeded inputs, and the golden file.

Nothing here knows a format: a Runner takes and returns numpy dicts, describes its inputs (an
``image`` input takes raw pixels, a ``tensor`` input normalised floats), and ``runner.numeric``
gives the outputs PyTorch's model computes too. The format says what parity is held to (a
:class:`Gate`). The golden file (``MODEL-RES.golden.npz``) keeps the seeded inputs exactly as the
artifact takes them and PyTorch's outputs for them, so ``check`` works later without the
checkpoint and an app developer can compare on the device.
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import metrics
from ..errors import EdgeExportError, first_line

GOLDEN_MAX_BYTES = 16_000_000   # inputs kept in the golden file: 3 samples, fewer for large inputs


@dataclass(frozen=True)
class Gate:
    """What parity is held to: max error relative to the output's scale, and (optionally) a lowest
    cosine. ``gated`` false: measured and recorded, but not enforced (``note`` says why)."""

    tolerance: float
    min_cosine: float | None = None
    gated: bool = True
    note: str = ""


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
    a = np.concatenate([metrics.rows(o) for o in outputs])
    b = np.concatenate([metrics.rows(r) for r in references])
    diff = np.abs(a - b)
    scale = float(np.abs(b).max()) or 1.0
    return Parity(max_abs=float(diff.max()), max_rel=float(diff.max() / scale),
                  cosine=float(metrics.cosine(a, b).min()), top1_agree=metrics.top1_agreement(a, b),
                  samples=int(a.shape[0]), tolerance=tolerance, reference=reference)


def judge(outputs: list[np.ndarray], references: list[np.ndarray], gate: Gate, reference: str) -> dict:
    """``compare`` held to a gate: the manifest's record of one parity check."""
    p = compare(outputs, references, gate.tolerance, reference)
    d = p.as_dict()
    within = p.passed and (gate.min_cosine is None or p.cosine >= gate.min_cosine)
    if gate.min_cosine is not None:
        d["min_cosine"] = gate.min_cosine
    d["within_gate"] = within
    d["gated"] = gate.gated
    d["passed"] = within or not gate.gated
    if gate.note:
        d["note"] = gate.note
    return d


def judge_outputs(outputs: list[list[np.ndarray]], references: list[list[np.ndarray]], names: list[str],
                  gate: Gate, reference: str) -> dict:
    """``judge`` per output (each held to its own scale): one output gives ``judge``'s record; several
    (a backbone's feature maps) give the worst figures over all, with each output's record under
    ``outputs``, passing only if every output passes."""
    per = {n: judge([o[i] for o in outputs], [r[i] for r in references], gate, reference)
           for i, n in enumerate(names)}
    if len(per) == 1:
        return next(iter(per.values()))
    d = {"max_abs": max(p["max_abs"] for p in per.values()), "max_rel": max(p["max_rel"] for p in per.values()),
         "cosine": min(p["cosine"] for p in per.values()), "samples": next(iter(per.values()))["samples"],
         "tolerance": gate.tolerance, "reference": reference,
         "worst": max(per, key=lambda n: per[n]["max_rel"]),
         "within_gate": all(p["within_gate"] for p in per.values()), "gated": gate.gated,
         "passed": all(p["passed"] for p in per.values()),
         "outputs": {n: {k: p[k] for k in ("max_abs", "max_rel", "cosine", "passed")} for n, p in per.items()}}
    if gate.min_cosine is not None:
        d["min_cosine"] = gate.min_cosine
    if gate.note:
        d["note"] = gate.note
    return d


def in_order(out: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    """A Runner's outputs as the program's outputs ``names``: by name where the runner uses them,
    else in the runner's order (an ExecuTorch program keeps no output names)."""
    if all(n in out for n in names):
        return [out[n] for n in names]
    if len(out) < len(names):
        raise EdgeExportError(f"the artifact has {len(out)} outputs ({', '.join(out)}) but {len(names)} are "
                              f"expected ({', '.join(names)}); re-export it")
    return list(out.values())[:len(names)]


def seeded_inputs(shape: tuple[int, ...], count: int, raw_scale: float | None, seed: int = 1234) -> list[torch.Tensor]:
    """``count`` seeded inputs: normalised-looking N(0, 1) tensors, or whole-number raw pixels in
    [0, raw_scale] (what a camera buffer holds)."""
    g = torch.Generator().manual_seed(seed)
    if raw_scale is None:
        return [torch.randn(shape, generator=g) for _ in range(count)]
    return [torch.randint(0, 256, shape, generator=g).float() * (raw_scale / 255.0) for _ in range(count)]


def seeded_feeds(inputs: list[dict], count: int = 3, raw_scale: float | None = None,
                 seed: int = 1234) -> list[dict[str, np.ndarray]]:
    """Seeded feeds for a Runner's inputs: raw pixels in [0, raw_scale] for a program that takes
    raw pixels, N(0, 1) otherwise."""
    per_input = {d["name"]: seeded_inputs(tuple(d["shape"]), count, raw_scale, seed + i)
                 for i, d in enumerate(inputs)}
    return [{name: xs[k].numpy() for name, xs in per_input.items()} for k in range(count)]


def raw_scale(normalization: dict) -> float | None:
    """The pixel range an artifact takes (255 for 0–255) where it normalises inside, else None."""
    if not normalization.get("in_graph"):
        return None
    return float(str(normalization.get("input_range", "0-255")).split("-")[-1])


def as_nchw(x: np.ndarray, normalization: dict) -> torch.Tensor:
    """An artifact's input as PyTorch's NCHW tensor (an NHWC artifact, ``layout: nhwc``, transposed)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.permute(0, 3, 1, 2).contiguous() if normalization.get("layout") == "nhwc" else t


def reference_input(x: np.ndarray, normalization: dict) -> torch.Tensor:
    """What the PyTorch model must be fed to match an artifact fed ``x``: the artifact's own input
    where it takes normalised tensors, else ``(x / scale − mean) / std`` in float64 as the
    ``normalize_input`` pass proves it; an NHWC input (``layout: nhwc``) is PyTorch's NCHW transposed."""
    t = as_nchw(x, normalization)
    scale = raw_scale(normalization)
    if scale is None:
        return t
    mean = torch.tensor(normalization["mean"], dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(normalization["std"], dtype=torch.float64).view(1, -1, 1, 1)
    return (t.double() / (scale * std) - mean / std).to(t.dtype)


def torch_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.numpy() for o in outs]


# --- the golden file -----------------------------------------------------------------------------

def write_golden(path: Path, feeds: list[dict[str, np.ndarray]], references: list[list[np.ndarray]],
                 output_names: list[str]) -> int:
    """Keep the seeded feeds and PyTorch's outputs (as many samples as fit GOLDEN_MAX_BYTES, at
    least one); returns how many were kept."""
    stacked = {name: _compact(np.stack([f[name] for f in feeds])) for name in feeds[0]}
    per_sample = sum(a[0].nbytes for a in stacked.values())
    keep = max(1, min(len(feeds), GOLDEN_MAX_BYTES // max(per_sample, 1)))
    arrays = {f"input:{name}": a[:keep] for name, a in stacked.items()}
    for i, name in enumerate(output_names):
        arrays[f"output:{name}"] = np.stack([r[i] for r in references[:keep]])
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return keep


def _compact(a: np.ndarray) -> np.ndarray:
    """Whole-number pixels 0–255 kept as uint8 (exact, a quarter of the bytes); anything else as is."""
    if a.dtype.kind == "f" and a.size and a.min() >= 0 and a.max() <= 255 and np.array_equal(a, np.round(a)):
        return a.astype(np.uint8)
    return a


def read_golden(path: Path) -> tuple[list[dict[str, np.ndarray]], list[list[np.ndarray]], list[str]]:
    """(feeds, references, output names) as written by :func:`write_golden`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ins = {k.split(":", 1)[1]: z[k].astype(np.float32) if z[k].dtype == np.uint8 else z[k]
                   for k in z.files if k.startswith("input:")}
            out_names = [k.split(":", 1)[1] for k in z.files if k.startswith("output:")]
            outs = [z[f"output:{n}"] for n in out_names]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise EdgeExportError(f"golden file {path} is not readable ({first_line(e)[:120]}); re-export the artifact, "
                              "or pass --weights to check against the checkpoint") from None
    if not ins or not outs or len({len(a) for a in [*ins.values(), *outs]}) != 1:
        raise EdgeExportError(f"golden file {path} does not hold matching input:/output: arrays; re-export the "
                              "artifact, or pass --weights to check against the checkpoint")
    count = len(next(iter(ins.values())))
    feeds = [{n: a[k] for n, a in ins.items()} for k in range(count)]
    return feeds, [[o[k] for o in outs] for k in range(count)], out_names
