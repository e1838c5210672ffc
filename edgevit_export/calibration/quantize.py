"""Quantize a model or an ONNX file, and say honestly what it cost in accuracy.

``quantize()`` checks every flag first (:mod:`.options`), resolves what to quantize
(:mod:`.target`) and on which images (:mod:`.calibrate`, :mod:`.evaluation`), then hands the job to
its format: static int8 QDQ ONNX (:mod:`.ort_int8`), static int8 ExecuTorch with XNNPACK
(:mod:`.pte_int8`) or Core ML weight compression (:mod:`.coreml_weights`). Bad input raises
:class:`~edgevit_export.errors.EdgeExportError` before anything is written; the artifact and its manifest are staged and moved into place together. A
drop beyond ``max_drop`` is reported in the result (``passed`` false), with the artifact kept for
inspection.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from ..errors import EdgeExportError
from ..exporters import artifacts, bundle
from ..progress import Callback
from .calibrate import calibration_source
from .data import PreprocessOverrides
from .coreml_weights import compress_coreml
from .evaluation import evaluation_set
from .options import AUTO_MAX_STEPS, QuantizeOptions
from .ort_int8 import quantize_onnx
from .pte_int8 import quantize_pte
from .tflite_int8 import quantize_tflite
from .results import Job, QuantizeResult, manifest_json
from .target import random_weights, resolve_target

__all__ = ["quantize"]

RANDOM_WEIGHTS = ("not gated: random weights — how far quantization moves a randomly initialised network says "
                  "nothing about your trained one (its logits are near-ties); pass --weights for a gated run")


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


def quantize(model: str, *, res=None, weights: str | None = None, calib: str | Path | None = None,
             calib_size: int = 256, method: str = "minmax", per_channel: bool = True,
             reduce_range: bool | None = None,
             eval_dir: str | Path | None = None, labels: str | Path | None = None, eval_size: int | None = None,
             max_drop: float = 1.0, keep_float: str | list[str] | None = None, keep_float_max: int = AUTO_MAX_STEPS,
             format: str = "onnx",
             weights_bits: int | None = None, palettize: int | None = None, sensitivity_samples: int | None = None,
             out: str | Path = "exports", force: bool = False, threads: int = 2, seed: int = 0,
             int8_io: bool = False, crop_pct=None, interpolation: str | None = None, mean=None, std=None,
             progress: Callback | None = None) -> QuantizeResult:
    """Quantize ``model`` (a zoo name, or an .onnx file) and measure what it cost.

    ``progress`` receives :class:`~edgevit_export.progress.Event`: counted tasks ("calibrate",
    "evaluate float + int8", …) and stages. ``crop_pct``/``interpolation``/``mean``/``std`` override
    the eval transform of the calibration and evaluation images (recorded in the manifest).
    """
    t0 = time.perf_counter()
    opts = QuantizeOptions(res=res, weights=weights, calib=calib, calib_size=calib_size, method=method,
                           per_channel=per_channel, reduce_range=reduce_range, eval_dir=eval_dir, labels=labels,
                           eval_size=eval_size, max_drop=max_drop, keep_float=keep_float,
                           keep_float_max=keep_float_max, format=format, weights_bits=weights_bits,
                           palettize=palettize, sensitivity_samples=sensitivity_samples, out=out, force=force,
                           threads=threads, seed=seed, int8_io=int8_io).validated()
    # the eval transform of calibration and evaluation (default: the model's own, or the .onnx manifest's)
    pre_overrides = PreprocessOverrides.parse(crop_pct, interpolation, mean, std)
    if opts.format == "coreml" and pre_overrides.normalization:
        raise EdgeExportError("--mean/--std with --format coreml: the package normalises inside its graph with the "
                              "model's mean/std; export it with 'edgevit-export export --format coreml --mean … "
                              "--std …' instead")
    # what to quantize, on which data
    target = resolve_target(model, opts.res, opts.weights, preprocess=pre_overrides)
    if opts.format != "onnx" and target.kind != "model":
        raise EdgeExportError(f"--format {opts.format} needs a model name (and --weights), not an .onnx file")
    calib_src, calib_scan = (calibration_source(opts.calib, target, opts.calib_size, opts.seed)
                             if opts.format != "coreml" else (None, None))
    eval_set = evaluation_set(opts.eval_dir, opts.labels, target)
    # where it goes
    out_dir = artifacts.check_out_dir(opts.out)
    base = f"{target.name}-{artifacts.res_tag(target.hw)}" if target.kind == "model" else target.name
    if opts.format == "onnx":
        artifact, manifest_path = out_dir / f"{base}.int8.onnx", out_dir / f"{base}.int8.json"
    elif opts.format in ("pte", "tflite"):
        suffix = f".{opts.format}"
        artifact, manifest_path = out_dir / f"{base}.int8{suffix}", out_dir / f"{base}.int8{suffix}.json"
    else:
        suffix = f"w{opts.weights_bits}" if opts.weights_bits else f"pal{opts.palettize}"
        artifact, manifest_path = out_dir / f"{base}.{suffix}.mlpackage", out_dir / f"{base}.{suffix}.coreml.json"
    artifacts.check_free([artifact, manifest_path, *bundle.side_paths(manifest_path)], opts.force)
    names = _labels(target, opts, eval_set)

    with artifacts.staging(out_dir) as tmp, _quiet():
        job = Job(target, opts, calib_src, calib_scan, eval_set, tmp, artifact, manifest_path)
        result = {"onnx": quantize_onnx, "pte": quantize_pte, "tflite": quantize_tflite,
                  "coreml": compress_coreml}[opts.format](job, progress)
        if random_weights(target, opts):
            result.gated, result.gate_note = False, RANDOM_WEIGHTS
            result.manifest["gate"] = result.gate_dict()
        result.seconds["total"] = time.perf_counter() - t0
        result.manifest["seconds"] = {k: round(v, 3) for k, v in result.seconds.items()}
        m = result.manifest
        side, stale = bundle.stage(tmp, m, manifest_path, names)      # io, labels file, MODEL-RES.md
        staged_manifest = tmp / manifest_path.name
        staged_manifest.write_text(manifest_json(m))
        artifacts.commit_all([(tmp / artifact.name, artifact), *side, (staged_manifest, manifest_path)], opts.force,
                             stale=stale)
    return result


def _labels(target, opts: QuantizeOptions, eval_set) -> bundle.Labels:
    """The class names of the quantized artifact: ``--labels`` (the class order of --eval), a
    labelled --eval folder's classes, an .onnx's own labels file, the checkpoint's, ImageNet-1k's."""
    from ..labels import read_labels
    from ..weights import checkpoint_classes

    n = target.num_classes
    if opts.labels is not None:
        return bundle.resolve_labels(n, read_labels(opts.labels), f"--labels {opts.labels}")
    if getattr(eval_set, "classes", None) and len(eval_set.classes) == n:
        return bundle.resolve_labels(n, list(eval_set.classes), f"--eval folder names ({eval_set.root})")
    if target.path is not None and target.float_manifest:      # the .onnx's own labels file
        from ..exporters import get

        beside = bundle.labels_beside(get("onnx").manifest_path(target.path), target.float_manifest)
        if beside is not None and len(beside) == n:
            return bundle.resolve_labels(n, beside, f"{target.path.name}'s labels file")
    return bundle.resolve_labels(n, checkpoint=checkpoint_classes(opts.weights) if opts.weights else None)
