"""What ``quantize`` works on (:class:`Job`), returns (the result dataclasses) and writes (the
manifest beside the artifact: how it was made, on which data, what it cost, which tools)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import accuracy as acc
from .options import QuantizeOptions
from .sensitivity import Sensitivity
from .target import Target


@dataclass
class Job:
    """One quantization, checked and resolved: what, how, on which data, staged where."""

    target: Target
    opts: QuantizeOptions
    calib_src: object             # ImageSource | SyntheticSource (ONNX), None (Core ML)
    calib_scan: object            # the calibration folder's ImageScan, None for synthetic / Core ML
    eval_set: object              # LabelledSet | ImageScan | None (see evaluation.evaluation_set)
    tmp: Path                     # staging directory
    artifact: Path
    manifest_path: Path


@dataclass
class CalibrationInfo:
    source: str
    synthetic: bool
    images: int
    requested: int
    files_sha256: str
    non_images: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    preprocess: str = ""

    def as_dict(self) -> dict:
        return {"source": self.source, "synthetic": self.synthetic, "images": self.images,
                "requested": self.requested, "files_sha256": self.files_sha256,
                "non_image_files_skipped": self.non_images,
                "corrupt_skipped": [{"path": p, "reason": r} for p, r in self.corrupt],
                "preprocess": self.preprocess}


@dataclass
class EvalInfo:
    source: str
    labelled: bool
    images: int
    classes: int | None = None
    non_images: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict:
        return {"source": self.source, "labelled": self.labelled, "images": self.images, "classes": self.classes,
                "non_image_files_skipped": self.non_images,
                "corrupt_skipped": [{"path": p, "reason": r} for p, r in self.corrupt], "note": self.note}


@dataclass
class KeepFloatStep:
    added: list[str]
    because: str           # the candidate this step tries, and what its ranking measured
    excluded: int          # nodes in float with this step
    drop: float
    kept: bool = True      # False: it did not lower the drop and was undone

    def as_dict(self) -> dict:
        return {"added": self.added, "because": self.because, "excluded_nodes": self.excluded, "drop": self.drop,
                "kept": self.kept}


@dataclass
class QuantizeResult:
    model: str
    format: str
    res: tuple[int, int]
    artifact: Path
    manifest_path: Path
    manifest: dict
    scheme: str                           # e.g. "int8 QDQ (uint8 activations, int8 per-channel weights)"
    method: str | None
    calibration: CalibrationInfo | None
    evaluation: EvalInfo
    comparison: acc.Comparison            # final float vs quantized
    baseline: acc.Comparison | None       # before keep-float (None when nothing was kept float)
    max_drop: float
    excluded: list[str] = field(default_factory=list)
    steps: list[KeepFloatStep] = field(default_factory=list)
    sensitivity: list[Sensitivity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sizes: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    ranking: list = field(default_factory=list)   # --keep-float auto's candidates, best first (rescue.Candidate)
    gated: bool = True                    # False: measured and recorded, not enforced (gate_note says why)
    gate_note: str = ""

    @property
    def drop(self) -> float:
        return self.comparison.drop

    @property
    def within(self) -> bool:
        """Whether the drop is within ``max_drop`` (enforced only when ``gated``)."""
        return self.drop <= self.max_drop + 1e-9

    @property
    def passed(self) -> bool:
        return self.within or not self.gated

    def gate_dict(self) -> dict:
        return {"max_drop": self.max_drop, "metric": self.comparison.drop_label, "drop": self.drop,
                "within": self.within, "gated": self.gated, "passed": self.passed, "note": self.gate_note}


@contextlib.contextmanager
def timed(seconds: dict[str, float], key: str):
    """``seconds[key]``: how long the ``with`` block took."""
    t = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - t


def manifest(res: QuantizeResult, target: Target, float_manifest: dict | None, opts: QuantizeOptions,
             per_channel: bool, staged: Path, tool: str, extra: dict | None = None) -> dict:
    """The manifest of ``res`` (``staged``: the artifact as written, for its sha256)."""
    from ..api import _tool_versions
    from ..exporters import artifacts

    fm = float_manifest or {}
    m = {
        "model": res.model,
        "source": {"kind": target.kind, "path": str(target.path) if target.path else None,
                   "weights": str(opts.weights) if opts.weights else fm.get("weights"),
                   "random_init": fm.get("random_init"), "float_sha256": fm.get("sha256")},
        "format": res.format,
        "resolution": list(res.res),
        "artifact": res.artifact.name,
        "quantization": {"tool": tool, "scheme": res.scheme, "method": res.method,
                         "per_channel": per_channel, "reduce_range": opts.reduce_range,
                         "weights_target": ("any CPU (7-bit weights)" if opts.reduce_range else
                                            "CPUs with int8 dot products: x86 VNNI/AMX or ARM (full 8-bit weights)")
                         if res.format == "onnx" else None,
                         "keep_float": opts.keep_float, "excluded_nodes": res.excluded,
                         "keep_float_steps": [s.as_dict() for s in res.steps],
                         "keep_float_ranking": [c.as_dict() for c in res.ranking]},
        "calibration": res.calibration.as_dict() if res.calibration else None,
        "evaluation": res.evaluation.as_dict(),
        "metrics": res.comparison.as_dict(),
        "metrics_before_keep_float": res.baseline.as_dict() if res.baseline else None,
        "gate": res.gate_dict(),
        "sensitivity": [s.as_dict() for s in res.sensitivity[:30]],
        "normalization": fm.get("normalization") or {"mean": list(target.preprocess.mean),
                                                     "std": list(target.preprocess.std), "in_graph": False},
        "io": fm.get("io"),
        "sizes": res.sizes,
        "notes": res.notes,
        "tools": _tool_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # the eval transform calibration and evaluation used (the model's own, the float manifest's, or
    # --crop-pct/--interpolation/--mean/--std): what an app must apply; its mean/std are the artifact's
    m["preprocess"] = target.preprocess.as_dict()
    m["normalization"] = {**m["normalization"], "mean": list(target.preprocess.mean),
                          "std": list(target.preprocess.std)}
    if extra:
        m.update(extra)
    m["sha256"] = artifacts.sha256(staged)
    return m


def manifest_json(m: dict) -> str:
    return json.dumps(_finite(m), indent=2, default=_json_default) + "\n"


def _finite(o):
    """JSON has no infinity: an SQNR of identical outputs (∞ dB) is written as null."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(type(o).__name__)
