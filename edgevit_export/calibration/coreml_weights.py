"""Core ML weight compression, and what it cost.

The model is exported to ``.mlpackage`` and its weights compressed with ``coremltools.optimize.coreml``
(8-bit linear, or 4/6/8-bit palettization with a k-means table). No calibration: the weights alone
are compressed. What it cost is measured on the package that ships: the compressed ``.mlpackage``
runs in the Core ML reference runner (:mod:`..exporters.coreml_runner`, its ``constexpr_*`` ops
decompressing exactly as coremltools does), against the float model in PyTorch.
"""

from __future__ import annotations


import numpy as np

from ..quiet import silenced
from ..exporters.artifacts import size_bytes
from ..progress import Callback, emit, prefixed
from . import accuracy as acc
from .data import LabelledSet
from .evaluation import eval_source, float_vs_quantized
from .results import Job, QuantizeResult, manifest, timed
from .target import random_init_note

COREML_WEIGHT_THRESHOLD = 2048  # coremltools' default: consts with more elements are compressed


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


def _compress_mlpackage(src, staged, palettize: int | None) -> str:
    """Compress the weights of the .mlpackage at ``src`` into ``staged``; returns the scheme."""
    from ..exporters.coreml import _ct

    ct = _ct()
    from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OpPalettizerConfig, OptimizationConfig,
                                             linear_quantize_weights, palettize_weights)

    with silenced():
        ml = ct.models.MLModel(str(src), skip_model_load=True)
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
        ml2.save(str(staged))
    return scheme


COREML_UNLABELLED_EVAL = 32   # the runner computes in fp16 emulation, about 1 s an image at 224 on 2 cores


def compress_coreml(job: Job, step: Callback | None) -> QuantizeResult:
    """Core ML weight compression of ``job``, staged in ``job.tmp``: the compressed package itself
    runs in the Core ML reference runner, against the float model in PyTorch."""
    from .. import api

    target, opts = job.target, job.opts
    seconds: dict[str, float] = {}
    notes = ["measured on the compressed package in the Core ML reference runner (fp16 compute, as on the "
             "phone) against the float model in PyTorch: the figures include fp16 rounding"]
    with timed(seconds, "export"):
        labels_arg = None
        if opts.labels is not None:
            labels_arg = str(opts.labels)
        elif isinstance(job.eval_set, LabelledSet) and target.num_classes != 1000:
            lf = job.tmp / "labels.txt"
            lf.write_text("\n".join(job.eval_set.classes) + "\n")
            labels_arg = str(lf)
        emit(step, "export Core ML")
        r = api.export(target.name, format="coreml", res=target.hw, weights=opts.weights, out=job.tmp / "float",
                       force=True, check=True, labels=labels_arg, progress=prefixed(step, "export Core ML: "))
        if r.random_init:
            notes.append(random_init_note(target.name))

    emit(step, "compress weights (coremltools.optimize)")
    staged = job.tmp / job.artifact.name
    with timed(seconds, "compress"):
        scheme = _compress_mlpackage(r.artifact, staged, opts.palettize)

    with timed(seconds, "evaluate"):
        emit(step, "build the float model and load the package")
        _, _, model, _ = api.prepare_model(target.name, target.hw, opts.weights, None)
        ev_src, ev_info = eval_source(job.eval_set, opts.eval_size, target, None, opts.seed,
                                      default_count=COREML_UNLABELLED_EVAL)
        _, comparison = float_vs_quantized(acc.TorchPredictor(model, opts.threads),
                                           acc.CoreMLPredictor(staged, target.preprocess, opts.threads), ev_src,
                                           ev_info, step, "evaluate float (PyTorch) + compressed (Core ML runner)",
                                           reference="float (PyTorch)",
                                           candidate="compressed package (Core ML reference runner)")
    if job.eval_set is None:
        notes.append(f"no --eval: the gate applies to {comparison.drop_label} on {ev_info.images} synthetic images")
    sizes = {"float_bytes": size_bytes(r.artifact), "compressed_bytes": size_bytes(staged)}
    res = QuantizeResult(target.name, "coreml", target.hw, job.artifact, job.manifest_path, {}, scheme, None, None,
                         ev_info, comparison, None, opts.max_drop, [], [], [], notes, sizes, seconds)
    res.manifest = manifest(res, target, r.manifest, opts, opts.weights_bits is not None, staged,
                            tool="coremltools.optimize.coreml",
                            extra={"compression": {"weights_bits": opts.weights_bits, "palettize_bits": opts.palettize,
                                                   "weight_threshold": COREML_WEIGHT_THRESHOLD,
                                                   "accuracy_measured_in": "the compressed package, Core ML "
                                                                           "reference runner (fp16), against "
                                                                           "PyTorch fp32"}})
    return res
