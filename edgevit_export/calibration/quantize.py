"""Quantize a model or an ONNX file, and say honestly what it cost in accuracy.

ONNX: static int8 QDQ with ``onnxruntime.quantization`` — ``quant_pre_process`` first, then
calibration over images through the model's own preprocessing (minmax, entropy or percentile;
histograms are built in chunks so large resolutions fit in memory), then QDQ with uint8
activations and int8 weights (per-channel or per-tensor). Float and int8 are run on the same
evaluation images: top-1/top-5 and the drop with labels, and always top-1 agreement, cosine and
SQNR of the logits. Per-layer sensitivity ranks the quantized tensors by the error their Q/DQ
injects; ``keep_float="auto"`` keeps the worst ones in float, one at a time, until the drop is
within ``max_drop``.

Core ML: the model is exported to ``.mlpackage`` and its weights compressed with
``coremltools.optimize.coreml`` (8-bit linear, or 4/6/8-bit palettization with a k-means table).
Core ML cannot run on Linux, so the accuracy of the compressed weights is measured in PyTorch by
applying the same compression (the same coremltools routine, or the same k-means function) to the
same BN-folded torch program.

Bad input raises :class:`~edgevit_export.errors.EdgeExportError` before anything is written; the
artifact and its manifest are staged and moved into place together. A drop beyond ``max_drop``
is reported in the result (``passed`` false), with the artifact kept for inspection.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError, EdgeExportError, ResolutionError
from ..registry import IMAGENET_MEAN, IMAGENET_STD
from . import accuracy as acc
from .data import (ImageScan, ImageSource, LabelledSet, Preprocess, SyntheticSource, check_classes, is_labelled,
                   scan_images, scan_labelled, spread)

METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("onnx", "coreml")
PALETTE_BITS = (4, 6, 8)
WEIGHT_BITS = (8,)
AUTO_MAX_STEPS = 12            # keep-float auto gives up after this many candidates
DEFAULT_UNLABELLED_EVAL = 200  # images compared float vs int8 when no --eval is given
CALIB_CHUNK = 16               # images per calibration pass (bounds memory at large resolutions)
COREML_WEIGHT_THRESHOLD = 2048  # coremltools' default: consts with more elements are compressed

Progress = Callable[[str, int, int], None]


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
    because: str           # the tensor whose error this step removes, and its SQNR
    excluded: int
    drop: float

    def as_dict(self) -> dict:
        return {"added": self.added, "because": self.because, "excluded_nodes": self.excluded, "drop": self.drop}


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
    sensitivity: list[acc.Sensitivity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sizes: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def drop(self) -> float:
        return self.comparison.drop

    @property
    def passed(self) -> bool:
        return self.drop <= self.max_drop + 1e-9


# --- the CPU -----------------------------------------------------------------------------------

@dataclass
class CpuInt8:
    model: str
    arch: str
    vnni: bool                  # avx512_vnni or avx_vnni (x86), or an ARM CPU with dot products
    flags: list[str]            # the int8-relevant flags found

    def describe(self) -> str:
        return f"{self.model or self.arch} ({', '.join(self.flags) or 'no int8 dot-product flags'})"


def cpu_int8() -> CpuInt8:
    """What this CPU offers int8 kernels, from /proc/cpuinfo (Linux) or platform facts."""
    import platform

    arch = platform.machine().lower()
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and not model:
                model = val.strip()
            elif key in ("flags", "features"):
                flags.update(val.split())
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    found = [f for f in wanted if f in flags]
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags) or (arch in ("arm64", "aarch64")
                                                                      and ("asimddp" in flags or not flags))
    return CpuInt8(model or platform.processor() or arch, arch, vnni, found)


def default_reduce_range() -> tuple[bool, str]:
    """7-bit weights where u8s8 int8 kernels saturate (x86 without VNNI), as onnxruntime advises."""
    c = cpu_int8()
    if c.arch in ("x86_64", "amd64", "i686", "x86") and not c.vnni:
        return True, (f"7-bit weight range (reduce_range) because this CPU has no VNNI ({c.describe()}): "
                      "onnxruntime's u8s8 AVX2 kernels saturate int16 sums at full 8-bit range; pass "
                      "--no-reduce-range for a VNNI or ARM target")
    return False, f"full 8-bit weights: this CPU has int8 dot products ({c.describe()})"


# --- validation --------------------------------------------------------------------------------

def parse_keep_float(spec: str | list[str] | None) -> str | list[str] | None:
    if spec is None or spec == "" or spec == []:
        return None
    if isinstance(spec, str):
        if spec.strip().lower() == "auto":
            return "auto"
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    if not names:
        raise EdgeExportError("--keep-float needs 'auto' or node names separated by commas")
    return names


@dataclass
class _Target:
    kind: str                     # "model" | "onnx"
    name: str                     # model name, or the file's stem
    path: Path | None
    hw: tuple[int, int]
    preprocess: Preprocess
    num_classes: int
    float_manifest: dict | None = None
    note: str = ""


def _onnx_io(path: Path):
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise EdgeExportError(f"cannot read ONNX file {path} ({type(e).__name__}); pass a valid .onnx") from None
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise EdgeExportError(f"{path} has {len(inputs)} inputs; quantize takes image classifiers with one input")

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]

    ops = {n.op_type for n in m.graph.node}
    return dims(inputs[0]), [dims(o) for o in m.graph.output], ops


def resolve_target(model: str, res, weights: str | None, purpose: str = "quantize") -> _Target:
    """A model name or an .onnx file → what to quantize, its resolution, preprocessing, classes."""
    from ..registry import get_model_info, parse_resolution

    p = Path(model).expanduser()
    if model.endswith(".mlpackage") or model.endswith(".mlmodel"):
        if purpose == "evaluate":
            raise EdgeExportError(f"{model}: Core ML cannot run on Linux; evaluate the model name (PyTorch, with "
                                  "--weights) or its ONNX export")
        raise EdgeExportError(f"{model}: Core ML packages cannot be re-quantized here; pass the model name with "
                              "--format coreml (and --weights) to compress its weights")
    if model.endswith(".onnx") or p.is_file():
        if not p.is_file():
            raise EdgeExportError(f"ONNX file not found: {p}")
        if weights is not None:
            raise EdgeExportError("--weights applies to model names; an .onnx file already holds its weights")
        in_dims, out_dims, ops = _onnx_io(p)
        if purpose == "quantize" and {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger"} & ops:
            raise EdgeExportError(f"{p} is already quantized; pass the float model (or its name)")
        if len(in_dims) != 4 or not all(isinstance(d, int) and d > 0 for d in in_dims[1:]) or in_dims[1] != 3:
            raise EdgeExportError(f"{p} takes input of shape {in_dims}; quantize needs a static N×3×H×W image "
                                  "input (export with edgevit-export export)")
        hw = (in_dims[2], in_dims[3])
        if res is not None:
            want = _parse_res_loose(res)
            if want != hw:
                raise ResolutionError(f"{p} takes {hw[0]}x{hw[1]} inputs, not {want[0]}x{want[1]}; "
                                      "drop --res or export the model at that resolution")
        ncls = out_dims[0][-1] if out_dims and out_dims[0] and isinstance(out_dims[0][-1], int) else None
        if ncls is None:
            raise EdgeExportError(f"{p} has no static class dimension on its output; export it with a fixed head")
        manifest = None
        mpath = p.with_suffix(".json")
        if mpath.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                manifest = json.loads(mpath.read_text())
        note = ""
        mean, std, raw = IMAGENET_MEAN, IMAGENET_STD, None
        if manifest and isinstance(manifest.get("normalization"), dict):
            nm = manifest["normalization"]
            mean, std = tuple(nm.get("mean", mean)), tuple(nm.get("std", std))
            if nm.get("in_graph"):
                rng = str(nm.get("input_range", "0-255"))
                raw = float(rng.split("-")[-1]) if "-" in rng else 255.0
        else:
            note = (f"no manifest beside {p.name}: assuming ImageNet mean/std normalisation "
                    "(export with edgevit-export to record it)")
        return _Target("onnx", p.stem, p, hw, Preprocess(hw, mean, std, raw_scale=raw), int(ncls), manifest, note)

    info = get_model_info(model)             # UnknownModelError for a bad name
    hw = parse_resolution(res, info)
    from ..registry import create_model

    net = create_model(model, weights=weights)   # WeightsError for a bad checkpoint
    ncls = getattr(net, "num_classes", None)
    if not isinstance(ncls, int):
        import torch

        with torch.no_grad():
            ncls = int(net(torch.zeros(1, 3, *hw)).shape[-1])
    return _Target("model", model, None, hw, Preprocess(hw, info.mean, info.std), ncls)


def _parse_res_loose(res) -> tuple[int, int]:
    if isinstance(res, (tuple, list)):
        return int(res[0]), int(res[1])
    try:
        parts = [int(v) for v in str(res).lower().split("x")]
    except ValueError:
        raise ResolutionError(f"resolution '{res}' is not a number; use e.g. 224 or 768x1024") from None
    return parts[0], parts[-1]


def calibration_source(calib: str | Path, target: _Target, size: int, seed: int = 0):
    """(source, scan) for a folder, or (SyntheticSource, None) for 'synthetic'."""
    if size < 1:
        raise EdgeExportError(f"--calib-size must be at least 1, got {size}")
    if str(calib) == "synthetic":
        return SyntheticSource(size, target.preprocess, seed=seed), None
    scan = scan_images(calib, what="calibration")
    return ImageSource(spread(scan.files, seed), target.preprocess, root=scan.root, limit=size), scan


def evaluation_set(eval_dir: str | Path | None, labels: str | Path | None, target: _Target):
    """A labelled set (checked against the model's head), an unlabelled scan, or None."""
    if eval_dir is None:
        if labels is not None:
            raise EdgeExportError("--labels needs --eval DIR (a labelled folder)")
        return None
    root = Path(eval_dir).expanduser()
    if labels is not None or (root.is_dir() and is_labelled(root)):
        ds = scan_labelled(root, labels, what="--eval")
        desc = f"{target.name}'s head" if target.kind == "model" else f"{target.path.name}"
        check_classes(ds, target.num_classes, desc)
        return ds
    return scan_images(root, what="--eval")


# --- calibration -------------------------------------------------------------------------------

class _Reader:
    """A CalibrationDataReader over at most ``count`` items of an iterator (static batch ``batch``)."""

    def __init__(self, items, input_name: str, batch: int, count: int, on_item: Callable[[], None]):
        self.items, self.input_name, self.batch, self.count, self.on_item = items, input_name, batch, count, on_item
        self.given = 0

    def get_next(self):
        if self.given >= self.count:
            return None
        xs = []
        for it in self.items:
            xs.append(it.x)
            self.on_item()
            if len(xs) == self.batch:
                break
        if not xs:
            return None
        while len(xs) < self.batch:
            xs.append(xs[-1])
        self.given += 1
        return {self.input_name: np.stack(xs)}

    def __iter__(self):
        return self

    def __next__(self):
        d = self.get_next()
        if d is None:
            raise StopIteration
        return d


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs advice through the root logger; keep it to errors while we
    run it (the CLI renders what matters), then restore the levels."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before):
            lg.setLevel(lvl)


def calibrate(pre_path: Path, source, method: str, workdir: Path, *, threads: int = 2,
              progress: Progress | None = None) -> Path:
    """Collect activation ranges over ``source``; returns the path of onnxruntime's calibration
    cache (reused by every quantization of the same model, so keep-float never re-calibrates)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}[method]
    # No max_intermediate_outputs: onnxruntime 1.32 drops (not merges) the outputs it collected when
    # that limit is hit. Feeding chunks of CALIB_CHUNK images per collect_data call bounds memory
    # the same way (every call reduces its chunk and merges with the ranges so far).
    extra: dict = {}
    op_types = list(set(QLinearOpsRegistry) | set(QDQRegistry))
    calibrator = create_calibrator(pre_path, op_types, augmented_model_path=str(workdir / "augmented.onnx"),
                                   calibrate_method=cm, extra_options=extra)
    # the calibrator's own session takes every core; use the same thread count as everything else
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if hasattr(calibrator, "infer_session"):
        calibrator.infer_session = ort.InferenceSession(str(workdir / "augmented.onnx"), sess_options=so,
                                                        providers=["CPUExecutionProvider"])
    inp = calibrator.infer_session.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else 1
    total = len(source)
    state = {"n": 0}

    def tick():
        state["n"] += 1
        if progress:
            progress("calibrate", state["n"], total)

    if progress:
        progress("calibrate", 0, total)
    items = iter(source)
    collected = 0
    while True:
        reader = _Reader(items, inp.name, batch, max(1, CALIB_CHUNK // batch), tick)
        first = reader.get_next()
        if first is None:
            break
        chunk = [first] + list(reader)
        collected += len(chunk)
        calibrator.collect_data(_ListReader(chunk))
    if collected == 0:
        skipped = getattr(source, "skipped", [])
        hint = f"; {len(skipped)} corrupt (first: {skipped[0][0]})" if skipped else ""
        raise DataError(f"no readable calibration images{hint}; pass a folder of valid images")
    ranges = calibrator.compute_data()
    cache = workdir / "calibration.json"
    save_tensors_data(ranges, cache)
    del calibrator
    return cache


class _ListReader:
    def __init__(self, feeds: list[dict]):
        self.feeds = list(feeds)

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None


def quantize_qdq(pre_path: Path, out_path: Path, cache: Path, method: str, *, per_channel: bool,
                 reduce_range: bool, exclude: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}[method]
    quantize_static(str(pre_path), str(out_path), None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(exclude), calibrate_method=cm, calibration_cache_path=str(cache),
                    extra_options={"QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})


# --- the command -------------------------------------------------------------------------------

def quantize(model: str, *, res=None, weights: str | None = None, calib: str | Path | None = None,
             calib_size: int = 256, method: str = "minmax", per_channel: bool = True,
             reduce_range: bool | None = None,
             eval_dir: str | Path | None = None, labels: str | Path | None = None, eval_size: int | None = None,
             max_drop: float = 1.0, keep_float: str | list[str] | None = None, keep_float_max: int = AUTO_MAX_STEPS,
             format: str = "onnx",
             weights_bits: int | None = None, palettize: int | None = None, sensitivity_samples: int = 8,
             out: str | Path = "exports", force: bool = False, threads: int = 2, seed: int = 0,
             progress: Progress | None = None) -> QuantizeResult:
    """Quantize ``model`` (a zoo name, or an .onnx file) and measure what it cost.

    ``progress(task, done, total)``: counted tasks ("calibrate", "evaluate float", …) with
    total > 0, and stage messages with total 0.
    """
    from ..exporters import artifacts

    step = progress or (lambda *_: None)
    t0 = time.perf_counter()
    # 1. flags
    if format not in FORMATS:
        raise EdgeExportError(f"unknown --format '{format}'; use onnx or coreml")
    if method not in METHODS:
        raise EdgeExportError(f"unknown --method '{method}'; use one of: {', '.join(METHODS)}")
    if max_drop is None or not math.isfinite(max_drop) or max_drop < 0:
        raise EdgeExportError(f"--max-drop must be a non-negative number of top-1 points, got {max_drop}")
    if eval_size is not None and eval_size < 1:
        raise EdgeExportError(f"--eval-size must be at least 1, got {eval_size}")
    if threads < 1:
        raise EdgeExportError(f"--threads must be at least 1, got {threads}")
    if sensitivity_samples < 0:
        raise EdgeExportError(f"--sensitivity must be 0 or more images, got {sensitivity_samples}")
    keep = parse_keep_float(keep_float)
    if keep_float_max < 1:
        raise EdgeExportError(f"--keep-float-max must be at least 1, got {keep_float_max}")
    rr_note = ""
    if reduce_range is None:
        reduce_range, rr_note = default_reduce_range() if format == "onnx" else (False, "")
    if format == "onnx" and (weights_bits is not None or palettize is not None):
        raise EdgeExportError("--weights-bits and --palettize apply to --format coreml; "
                              "ONNX quantization is int8 QDQ")
    if format == "coreml":
        if keep is not None:
            raise EdgeExportError("--keep-float applies to --format onnx (Core ML compresses weights only)")
        if weights_bits is not None and palettize is not None:
            raise EdgeExportError("pass either --weights-bits 8 or --palettize N, not both")
        if palettize is not None and palettize not in PALETTE_BITS:
            raise EdgeExportError(f"--palettize takes 4, 6 or 8 bits, got {palettize}")
        if weights_bits is not None and weights_bits not in WEIGHT_BITS:
            raise EdgeExportError(f"--weights-bits takes 8 (linear int8), got {weights_bits}; "
                                  "for fewer bits use --palettize 4 or 6")
        if palettize is None and weights_bits is None:
            weights_bits = 8
    # 2. what to quantize, data
    target = resolve_target(model, res, weights)
    if format == "coreml" and target.kind != "model":
        raise EdgeExportError("--format coreml needs a model name (and --weights), not an .onnx file")
    calib_src = calib_scan = None
    if format == "onnx":
        if calib is None:
            raise EdgeExportError("int8 quantization needs calibration images: pass --calib DIR (images like "
                                  "the ones the model will see) or --calib synthetic for a smoke run")
        calib_src, calib_scan = calibration_source(calib, target, calib_size, seed)
    eval_set = evaluation_set(eval_dir, labels, target)
    # 3. where it goes
    out_dir = artifacts.check_out_dir(out)
    tag = artifacts.res_tag(target.hw)
    base = f"{target.name}-{tag}" if target.kind == "model" else target.name
    if format == "onnx":
        artifact = out_dir / f"{base}.int8.onnx"
        manifest_path = out_dir / f"{base}.int8.json"
    else:
        suffix = f"w{weights_bits}" if weights_bits else f"pal{palettize}"
        artifact = out_dir / f"{base}.{suffix}.mlpackage"
        manifest_path = out_dir / f"{base}.{suffix}.coreml.json"
    artifacts.check_free([artifact, manifest_path], force)

    with artifacts.staging(out_dir) as tmp, _quiet():
        if format == "onnx":
            res_obj = _quantize_onnx(target, weights, calib, calib_src, calib_scan, method, per_channel,
                                     reduce_range, eval_set, eval_dir, eval_size, max_drop, keep, keep_float_max,
                                     sensitivity_samples, threads, seed, tmp, artifact, manifest_path, step)
            if rr_note:
                res_obj.notes.insert(0, rr_note)
        else:
            res_obj = _compress_coreml(target, weights, weights_bits, palettize, eval_set, eval_dir, eval_size,
                                       max_drop, threads, seed, tmp, artifact, manifest_path, labels, step)
        res_obj.seconds["total"] = time.perf_counter() - t0
        res_obj.manifest["seconds"] = {k: round(v, 3) for k, v in res_obj.seconds.items()}
        staged_manifest = tmp / manifest_path.name
        staged_manifest.write_text(json.dumps(_finite(res_obj.manifest), indent=2, default=_json_default) + "\n")
        artifacts.commit(tmp / artifact.name, artifact)
        artifacts.commit(staged_manifest, manifest_path)
    return res_obj


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


def _eval_source(eval_set, eval_dir, eval_size, target: _Target, calib_src, seed: int):
    """(source, EvalInfo): the labelled set, an unlabelled folder, or held-out calibration images."""
    pre = target.preprocess
    if isinstance(eval_set, LabelledSet):
        files, labels = eval_set.files, eval_set.labels
        if eval_size is not None and eval_size < len(files):
            order = spread(list(range(len(files))), seed)[:eval_size]
            order.sort()
            files, labels = [files[i] for i in order], [labels[i] for i in order]
        src = ImageSource(files, pre, labels=labels, root=eval_set.root)
        return src, EvalInfo(str(eval_set.root), True, len(files), len(eval_set.classes), eval_set.non_images)
    if isinstance(eval_set, ImageScan):
        files = spread(eval_set.files, seed)[: eval_size or len(eval_set.files)]
        src = ImageSource(files, pre, root=eval_set.root)
        return src, EvalInfo(str(eval_set.root), False, len(files), None, eval_set.non_images,
                             note="no class folders: agreement with float, not accuracy")
    n = eval_size or DEFAULT_UNLABELLED_EVAL
    if calib_src is None or isinstance(calib_src, SyntheticSource):
        src = SyntheticSource(n, pre, seed=seed + 1000)
        return src, EvalInfo("synthetic (drawn shapes, other seed)", False, n,
                             note="no --eval: agreement with float on synthetic images, not accuracy")
    # held-out images of the calibration folder (the ones calibration did not use), else the same
    rest = [f for f in calib_src.files if f not in set(calib_src.used)]
    files = rest[:n] if rest else calib_src.used[:n]
    note = ("no --eval: agreement with float on calibration-folder images not used for calibration"
            if rest else "no --eval: agreement with float on the calibration images themselves")
    return ImageSource(files, pre, root=calib_src.root), EvalInfo(str(calib_src.root), False, len(files), note=note)


def _quantize_onnx(target: _Target, weights, calib, calib_src, calib_scan, method, per_channel, reduce_range,
                   eval_set, eval_dir, eval_size, max_drop, keep, keep_max, sens_n, threads, seed, tmp: Path,
                   artifact: Path, manifest_path: Path, step: Progress) -> QuantizeResult:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .. import api

    seconds: dict[str, float] = {}
    notes: list[str] = []
    if target.note:
        notes.append(target.note)
    t = time.perf_counter()
    if target.kind == "model":
        step("export float ONNX", 0, 0)
        r = api.export(target.name, format="onnx", res=target.hw, weights=weights, out=tmp / "float", force=True,
                       check=True, progress=lambda s: step(f"export float ONNX: {s}", 0, 0))
        if not r.passed:
            raise EdgeExportError(f"the float ONNX export of {target.name} did not match PyTorch "
                                  "(run 'edgevit-export export' to see the parity figures)")
        float_path, float_manifest = r.artifact, r.manifest
        if r.random_init:
            notes.append(f"no --weights: {target.name} is randomly initialised; its accuracy means nothing")
    else:
        float_path, float_manifest = target.path, target.float_manifest
    seconds["export"] = time.perf_counter() - t

    t = time.perf_counter()
    step("pre-process (shape inference, optimisation)", 0, 0)
    pre_path = tmp / "float.pre.onnx"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quant_pre_process(str(float_path), str(pre_path), skip_symbolic_shape=False)
    seconds["pre_process"] = time.perf_counter() - t

    import onnx

    node_names = [n.name for n in onnx.load(str(pre_path), load_external_data=False).graph.node]
    excluded: list[str] = []
    if isinstance(keep, list):
        unknown = [k for k in keep if k not in set(node_names)]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], node_names, n=2, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise EdgeExportError(f"--keep-float: no node named {unknown[0]!r}{hint}; names are those of the "
                                  "sensitivity table (run once without --keep-float to see them)")
        excluded = list(keep)

    t = time.perf_counter()
    cache = calibrate(pre_path, calib_src, method, tmp, threads=threads, progress=step)
    seconds["calibrate"] = time.perf_counter() - t
    skipped = list(calib_src.skipped)
    requested = calib_src.count if calib_src.synthetic else calib_src.limit
    calib_info = CalibrationInfo(
        "synthetic" if calib_src.synthetic else str(calib_scan.root), calib_src.synthetic, len(calib_src.used),
        requested, calib_src.digest(), calib_scan.non_images if calib_scan else 0, skipped,
        target.preprocess.describe())
    if calib_src.synthetic:
        notes.append("SYNTHETIC calibration (drawn shapes): a smoke run of the pipeline, not for shipping — "
                     "calibrate on real images from your domain")
    elif len(calib_src.used) < requested:
        notes.append(f"calibrated on {len(calib_src.used)} images ({requested} requested; the folder has "
                     "no more readable images)")

    staged = tmp / artifact.name
    t = time.perf_counter()
    step("quantize", 0, 0)
    quantize_qdq(pre_path, staged, cache, method, per_channel=per_channel, reduce_range=reduce_range,
                 exclude=excluded)
    seconds["quantize"] = time.perf_counter() - t

    # evaluation: float once, int8 per attempt
    t = time.perf_counter()
    ev_src, ev_info = _eval_source(eval_set, eval_dir, eval_size, target, calib_src, seed)
    fp = acc.OrtPredictor(pre_path, threads=threads)
    q = acc.OrtPredictor(staged, threads=threads)
    lg = acc.collect_logits({"float": fp, "int8": q}, ev_src, progress=step, task="evaluate float + int8")
    ev_info.images = len(lg.keys)
    ev_info.corrupt = lg.skipped
    if ev_info.images == 0:
        raise DataError(f"no readable evaluation images in {ev_info.source}; pass a folder of valid images")
    ref = lg.values["float"]
    comparison = acc.compare(ref, lg.values["int8"], lg.labels)
    baseline = None
    seconds["evaluate"] = time.perf_counter() - t

    # sensitivity on a few calibration images
    sens: list[acc.Sensitivity] = []
    if sens_n > 0 or keep == "auto":
        t = time.perf_counter()
        n = max(sens_n, 4) if keep == "auto" else sens_n
        if calib_src.synthetic:
            s_src = SyntheticSource(n, target.preprocess, seed=seed)
        else:
            s_src = ImageSource(list(calib_src.used), target.preprocess, root=calib_src.root, limit=n)
        sens = acc.sensitivity(pre_path, staged, s_src, tmp / "debug", threads=threads, progress=step)
        seconds["sensitivity"] = time.perf_counter() - t

    steps: list[KeepFloatStep] = []
    if keep == "auto" and comparison.drop > max_drop:
        t = time.perf_counter()
        baseline = comparison
        cached_items = None
        for cand in sens:
            if len(steps) >= keep_max:
                break
            new = [nm for nm in cand.nodes if nm not in excluded]
            if not new:
                continue
            excluded.extend(new)
            step(f"keep float: {', '.join(new)[:60]}", 0, 0)
            quantize_qdq(pre_path, staged, cache, method, per_channel=per_channel, reduce_range=reduce_range,
                         exclude=excluded)
            q = acc.OrtPredictor(staged, threads=threads)
            if cached_items is None and len(ev_src) <= 2048:
                cached_items = list(ev_src)      # images once in memory, not re-read each step
            lq = acc.collect_logits({"int8": q}, cached_items if cached_items is not None else ev_src,
                                    progress=step, task=f"evaluate int8 (keep-float step {len(steps) + 1})")
            comparison = acc.compare(ref, lq.values["int8"], lg.labels)
            steps.append(KeepFloatStep(new, f"{cand.kind} {cand.tensor} ({cand.sqnr_db:.1f} dB)", len(excluded),
                                       comparison.drop))
            if comparison.drop <= max_drop:
                break
        seconds["keep_float"] = time.perf_counter() - t
        if comparison.drop > max_drop:
            notes.append(f"--keep-float auto kept {len(excluded)} nodes in float over {len(steps)} steps and the "
                         f"drop is still {comparison.drop:.2f} > {max_drop:g}; try --method percentile or entropy, "
                         "more calibration images, or --per-channel")
    if eval_set is None:
        notes.append(f"no --eval: the gate applies to {comparison.drop_label} ({ev_info.note.split(': ', 1)[-1]})")

    scheme = ("int8 QDQ: uint8 asymmetric activations, int8 symmetric "
              f"{'per-channel' if per_channel else 'per-tensor'} weights"
              + (" (7-bit range)" if reduce_range else ""))
    sizes = {"float_bytes": float_path.stat().st_size, "int8_bytes": staged.stat().st_size}
    res = QuantizeResult(target.name, "onnx", target.hw, artifact, manifest_path, {}, scheme, method, calib_info,
                         ev_info, comparison, baseline, max_drop, excluded, steps, sens, notes, sizes, seconds)
    res.manifest = _manifest(res, target, float_manifest, weights, keep, reduce_range, per_channel, staged,
                             tool="onnxruntime.quantization (quant_pre_process + quantize_static, QDQ)")
    return res


def _manifest(res: QuantizeResult, target: _Target, float_manifest: dict | None, weights, keep, reduce_range,
              per_channel, staged: Path, tool: str, extra: dict | None = None) -> dict:
    from ..api import _tool_versions
    from ..exporters import artifacts

    fm = float_manifest or {}
    m = {
        "model": res.model,
        "source": {"kind": target.kind, "path": str(target.path) if target.path else None,
                   "weights": str(weights) if weights else fm.get("weights"),
                   "random_init": fm.get("random_init"), "float_sha256": fm.get("sha256")},
        "format": res.format,
        "resolution": list(res.res),
        "artifact": res.artifact.name,
        "quantization": {"tool": tool, "scheme": res.scheme, "method": res.method,
                         "per_channel": per_channel, "reduce_range": reduce_range,
                         "keep_float": keep, "excluded_nodes": res.excluded,
                         "keep_float_steps": [s.as_dict() for s in res.steps]},
        "calibration": res.calibration.as_dict() if res.calibration else None,
        "evaluation": res.evaluation.as_dict(),
        "metrics": res.comparison.as_dict(),
        "metrics_before_keep_float": res.baseline.as_dict() if res.baseline else None,
        "gate": {"max_drop": res.max_drop, "metric": res.comparison.drop_label, "drop": res.drop,
                 "passed": res.passed},
        "sensitivity": [s.as_dict() for s in res.sensitivity[:30]],
        "normalization": fm.get("normalization") or {"mean": list(target.preprocess.mean),
                                                     "std": list(target.preprocess.std), "in_graph": False},
        "io": fm.get("io"),
        "sizes": res.sizes,
        "notes": res.notes,
        "tools": _tool_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        m.update(extra)
    m["sha256"] = artifacts.sha256(staged)
    return m


# --- Core ML weight compression -------------------------------------------------------------

def kmeans_lut(val: np.ndarray, nbits: int, iters: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means palette of ``2**nbits`` entries for ``val`` → (lut, uint8 indices, flat).

    Deterministic: centroids start at evenly spaced quantiles; Lloyd iterations run on the sorted
    values with prefix sums (in 1-D each cluster is a contiguous run between the midpoints of
    sorted centroids), so one iteration costs O(k log n). Used both by the Core ML palettization
    (as coremltools' custom LUT function) and by its PyTorch emulation.
    """
    flat = np.asarray(val, dtype=np.float64).reshape(-1)
    k = 1 << nbits
    uniq = np.unique(flat)
    if len(uniq) <= k:
        lut = np.zeros(k, np.float64)
        lut[: len(uniq)] = uniq
        lut[len(uniq):] = uniq[-1]
        idx = np.searchsorted(uniq, flat)
        return lut.astype(val.dtype), idx.astype(np.uint8)
    xs = np.sort(flat)
    cs = np.concatenate([[0.0], np.cumsum(xs)])
    cent = np.quantile(xs, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        bounds = (cent[1:] + cent[:-1]) / 2
        pos = np.concatenate([[0], np.searchsorted(xs, bounds), [len(xs)]])
        counts = np.diff(pos)
        sums = cs[pos[1:]] - cs[pos[:-1]]
        new = np.where(counts > 0, sums / np.maximum(counts, 1), cent)
        new = np.sort(new)
        if np.array_equal(new, cent):
            break
        cent = new
    bounds = (cent[1:] + cent[:-1]) / 2
    idx = np.searchsorted(bounds, flat)
    return cent.astype(val.dtype), idx.astype(np.uint8)


class _KMeansLut:
    """Picklable LUT function for coremltools' ``mode='custom'`` palettization."""

    def __init__(self, nbits: int):
        self.nbits = nbits

    def __call__(self, val: np.ndarray):
        return kmeans_lut(val, self.nbits)


def _linear_int8(w: np.ndarray, axis: int | None) -> np.ndarray:
    """coremltools' own linear symmetric int8 (per output channel on ``axis``) → dequantized."""
    from ..exporters.coreml import _ct

    _ct()  # import coremltools quietly first
    from coremltools.optimize import _utils as ou
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights as lq

    block = [0] * w.ndim
    if axis is not None:
        block[axis] = 1
    p = lq.blockwise_compress(w, nbits=8, mode="LINEAR_SYMMETRIC", signed=True, block_sizes=block)
    if p is None:
        return w
    return ou.dequantize_by_scale_and_zp(p.data, p.scale, p.offset).astype(w.dtype)


def _palettize(w: np.ndarray, nbits: int) -> np.ndarray:
    lut, idx = kmeans_lut(w, nbits)
    return lut[idx.astype(np.int64)].reshape(w.shape).astype(w.dtype)


def compress_torch_weights(gm, *, weights_bits: int | None, palettize: int | None,
                           threshold: int = COREML_WEIGHT_THRESHOLD) -> dict:
    """Apply Core ML's weight compression to a torch GraphModule in place; returns counts.

    Every parameter/buffer/constant with more than ``threshold`` elements is compressed, as
    coremltools compresses every const above its weight_threshold; linear int8 is per output
    channel (axis 0, axis 1 for transposed convolutions) for conv/linear weights, per tensor
    otherwise; palettization is per tensor.
    """
    import torch

    axis_of: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr":
            if "conv_transpose" in name:
                axis_of[node.args[1].target] = 1
            elif "convolution" in name:
                axis_of[node.args[1].target] = 1 if (len(node.args) > 6 and node.args[6]) else 0
            elif "conv" in name or "linear" in name:
                axis_of[node.args[1].target] = 0
    done = {"tensors": 0, "elements": 0}
    with torch.no_grad():
        named: dict[str, torch.Tensor] = {}
        for n in gm.graph.nodes:   # the constants the program uses (folding leaves dead originals)
            if n.op == "call_module":   # a traced (not exported) module: its conv/linear weights
                mod = gm.get_submodule(n.target)
                w = getattr(mod, "weight", None)
                if isinstance(w, torch.Tensor) and f"{n.target}.weight" not in named:
                    named[f"{n.target}.weight"] = w
                    axis_of[f"{n.target}.weight"] = 1 if isinstance(mod, torch.nn.modules.conv._ConvTransposeNd) else 0
                continue
            if n.op != "get_attr" or not n.users or n.target in named:
                continue
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.Tensor):
                named[n.target] = obj
        for name, tensor in named.items():
            if not tensor.is_floating_point() or tensor.numel() <= threshold:
                continue
            w = tensor.detach().cpu().numpy().astype(np.float32)
            if palettize is not None:
                new = _palettize(w, palettize)
            else:
                new = _linear_int8(w, axis_of.get(name) if w.ndim >= 2 else None)
            tensor.copy_(torch.from_numpy(new))
            done["tensors"] += 1
            done["elements"] += int(w.size)
    return done


def _compress_coreml(target: _Target, weights, weights_bits, palettize, eval_set, eval_dir, eval_size, max_drop,
                     threads, seed, tmp: Path, artifact: Path, manifest_path: Path, labels, step) -> QuantizeResult:
    import torch

    from .. import api
    from ..exporters.coreml import _ct
    from ..passes import PassContext, run_passes

    seconds: dict[str, float] = {}
    notes = ["Core ML cannot run on Linux: these accuracy figures are measured in PyTorch, with the same weight "
             "compression applied to the same BN-folded torch program (fp32 compute; the phone computes in fp16)"]
    t = time.perf_counter()
    labels_arg = None
    if labels is not None:
        labels_arg = str(labels)
    elif isinstance(eval_set, LabelledSet) and target.num_classes != 1000:
        lf = tmp / "labels.txt"
        lf.write_text("\n".join(eval_set.classes) + "\n")
        labels_arg = str(lf)
    step("export Core ML", 0, 0)
    r = api.export(target.name, format="coreml", res=target.hw, weights=weights, out=tmp / "float", force=True,
                   check=True, labels=labels_arg, progress=lambda s: step(f"export Core ML: {s}", 0, 0))
    if r.random_init:
        notes.append(f"no --weights: {target.name} is randomly initialised; its accuracy means nothing")
    seconds["export"] = time.perf_counter() - t

    t = time.perf_counter()
    step("compress weights (coremltools.optimize)", 0, 0)
    ct = _ct()
    from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OpPalettizerConfig, OptimizationConfig,
                                             linear_quantize_weights, palettize_weights)

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ml = ct.models.MLModel(str(r.artifact), skip_model_load=True)
        if palettize is not None:
            cfg = OptimizationConfig(global_config=OpPalettizerConfig(
                mode="custom", lut_function=_KMeansLut(palettize), granularity="per_tensor",
                weight_threshold=COREML_WEIGHT_THRESHOLD))
            ml2 = palettize_weights(ml, cfg)
            scheme = f"{palettize}-bit palettization (k-means LUT per tensor), coremltools.optimize"
        else:
            cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel",
                weight_threshold=COREML_WEIGHT_THRESHOLD))
            ml2 = linear_quantize_weights(ml, cfg)
            scheme = "int8 linear symmetric per-channel weights, coremltools.optimize (activations fp16)"
        staged = tmp / artifact.name
        ml2.save(str(staged))
    seconds["compress"] = time.perf_counter() - t

    # the same compression on the torch side
    t = time.perf_counter()
    step("apply the same compression in PyTorch", 0, 0)
    info, hw, model, _ = api.prepare_model(target.name, target.hw, weights, None)
    example = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    ep = api.capture(model, example)
    pipe = run_passes(ep, ["static_shapes", "fold_batchnorm"], PassContext((example,), mean=info.mean, std=info.std))
    gm_float = pipe.program.module()
    gm_comp = copy.deepcopy(gm_float)
    counts = compress_torch_weights(gm_comp, weights_bits=weights_bits, palettize=palettize)
    ev_src, ev_info = _eval_source(eval_set, eval_dir, eval_size, target, None, seed)
    lg = acc.collect_logits({"float": acc.TorchPredictor(gm_float, threads, batch=1),
                             "compressed": acc.TorchPredictor(gm_comp, threads, batch=1)}, ev_src, progress=step,
                            task="evaluate float + compressed (PyTorch)")
    ev_info.images = len(lg.keys)
    ev_info.corrupt = lg.skipped
    if ev_info.images == 0:
        raise DataError(f"no readable evaluation images in {ev_info.source}; pass a folder of valid images")
    comparison = acc.compare(lg.values["float"], lg.values["compressed"], lg.labels, reference="float (PyTorch)",
                             candidate="compressed weights (PyTorch emulation)")
    seconds["evaluate"] = time.perf_counter() - t
    if eval_set is None:
        notes.append(f"no --eval: the gate applies to {comparison.drop_label} on synthetic images")
    sizes = {"float_bytes": _dir_size(r.artifact), "compressed_bytes": _dir_size(staged),
             "torch_tensors_compressed": counts["tensors"]}
    res = QuantizeResult(target.name, "coreml", target.hw, artifact, manifest_path, {}, scheme, None, None, ev_info,
                         comparison, None, max_drop, [], [], [], notes, sizes, seconds)
    res.manifest = _manifest(res, target, r.manifest, weights, None, False, weights_bits is not None, staged,
                             tool="coremltools.optimize.coreml",
                             extra={"compression": {"weights_bits": weights_bits, "palettize_bits": palettize,
                                                    "weight_threshold": COREML_WEIGHT_THRESHOLD,
                                                    "accuracy_measured_in": "pytorch (same compression applied "
                                                                            "to the BN-folded torch program)"}})
    return res


def _dir_size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# --- evaluate ----------------------------------------------------------------------------------

@dataclass
class EvaluateResult:
    model: str
    kind: str                    # "pytorch" | "onnx"
    res: tuple[int, int]
    dataset: LabelledSet
    topk: acc.TopK
    corrupt: list[tuple[str, str]]
    per_class: dict[str, float]  # class → top-1 percent
    seconds: float
    notes: list[str] = field(default_factory=list)


def evaluate(model: str, data: str | Path, *, res=None, weights: str | None = None, labels: str | Path | None = None,
             limit: int | None = None, threads: int = 2, seed: int = 0,
             progress: Progress | None = None) -> EvaluateResult:
    """Top-1/top-5 of a model (PyTorch) or an .onnx artifact on a labelled folder."""
    from .. import api

    if threads < 1:
        raise EdgeExportError(f"--threads must be at least 1, got {threads}")
    if limit is not None and limit < 1:
        raise EdgeExportError(f"--limit must be at least 1, got {limit}")
    target = resolve_target(model, res, weights, purpose="evaluate")
    root = Path(data).expanduser()
    ds = scan_labelled(root, labels, what="--data")
    desc = f"{target.name}'s head" if target.kind == "model" else f"{target.path.name}"
    check_classes(ds, target.num_classes, desc, what="--data")
    notes = [target.note] if target.note else []
    if target.kind == "model":
        _, _, net, random_init = api.prepare_model(target.name, target.hw, weights, None)
        if random_init:
            notes.append(f"no --weights: {target.name} is randomly initialised; its accuracy means nothing")
        pred = acc.TorchPredictor(net, threads)
        kind = "pytorch"
    else:
        pred = acc.OrtPredictor(target.path, threads=threads)
        kind = "onnx"
    files, labs = ds.files, ds.labels
    if limit is not None and limit < len(files):
        order = sorted(spread(list(range(len(files))), seed)[:limit])
        files, labs = [files[i] for i in order], [labs[i] for i in order]
    src = ImageSource(files, target.preprocess, labels=labs, root=ds.root)
    t = time.perf_counter()
    lg = acc.collect_logits({"m": pred}, src, progress=progress, task="evaluate")
    if not lg.keys:
        raise DataError(f"no readable images in --data {root} ({len(lg.skipped)} corrupt); pass valid images")
    logits = lg.values["m"]
    tk = acc.top_k(logits, lg.labels)
    per_class = {}
    pred_cls = logits.argmax(1)
    for k, name in enumerate(ds.classes):
        mask = lg.labels == k
        if mask.any():
            per_class[name] = float((pred_cls[mask] == k).mean() * 100)
    return EvaluateResult(target.name, kind, target.hw, ds, tk, lg.skipped, per_class, time.perf_counter() - t, notes)
