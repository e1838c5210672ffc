"""Core ML weight compression, and what it cost.

The model is exported to ``.mlpackage`` and its weights compressed with ``coremltools.optimize.coreml``
(8-bit linear, or 4/6/8-bit palettization with a k-means table). The accuracy of the compressed
weights is measured in PyTorch by applying the same compression (the same coremltools routine, or
the same k-means function) to the same BN-folded torch program; the compressed package itself
runs in the Core ML reference runner (``edgevit-export run`` / ``check``), which does not yet
drive this evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

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



def _compress_mlpackage(src, staged, palettize: int | None) -> str:
    """Compress the weights of the .mlpackage at ``src`` into ``staged``; returns the scheme."""
    from ..exporters.coreml import _ct

    ct = _ct()
    from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OpPalettizerConfig, OptimizationConfig,
                                             linear_quantize_weights, palettize_weights)

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
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


def _torch_programs(job: Job):
    """The BN-folded torch program of the model, float and with the same compression applied."""
    import torch

    from .. import api
    from ..passes import PassContext, run_passes

    opts = job.opts
    info, hw, model, _ = api.prepare_model(job.target.name, job.target.hw, opts.weights, None)
    example = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    ep = api.capture(model, example)
    pipe = run_passes(ep, ["static_shapes", "fold_batchnorm"], PassContext((example,), mean=info.mean, std=info.std))
    gm_float = pipe.program.module()
    gm_comp = copy.deepcopy(gm_float)
    counts = compress_torch_weights(gm_comp, weights_bits=opts.weights_bits, palettize=opts.palettize)
    return gm_float, gm_comp, counts


def compress_coreml(job: Job, step: Callback | None) -> QuantizeResult:
    """Core ML weight compression of ``job``, staged in ``job.tmp``; accuracy measured in PyTorch."""
    from .. import api

    target, opts = job.target, job.opts
    seconds: dict[str, float] = {}
    notes = ["these accuracy figures are measured in PyTorch, with the same weight compression applied to the "
             "same BN-folded torch program (fp32 compute; the phone computes in fp16)"]
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

    emit(step, "apply the same compression in PyTorch")
    with timed(seconds, "evaluate"):
        gm_float, gm_comp, counts = _torch_programs(job)
        ev_src, ev_info = eval_source(job.eval_set, opts.eval_size, target, None, opts.seed)
        _, comparison = float_vs_quantized(acc.TorchPredictor(gm_float, opts.threads, batch=1),
                                           acc.TorchPredictor(gm_comp, opts.threads, batch=1), ev_src, ev_info,
                                           step, "evaluate float + compressed (PyTorch)",
                                           reference="float (PyTorch)",
                                           candidate="compressed weights (PyTorch emulation)")
    if job.eval_set is None:
        notes.append(f"no --eval: the gate applies to {comparison.drop_label} on synthetic images")
    sizes = {"float_bytes": size_bytes(r.artifact), "compressed_bytes": size_bytes(staged),
             "torch_tensors_compressed": counts["tensors"]}
    res = QuantizeResult(target.name, "coreml", target.hw, job.artifact, job.manifest_path, {}, scheme, None, None,
                         ev_info, comparison, None, opts.max_drop, [], [], [], notes, sizes, seconds)
    res.manifest = manifest(res, target, r.manifest, opts, opts.weights_bits is not None, staged,
                            tool="coremltools.optimize.coreml",
                            extra={"compression": {"weights_bits": opts.weights_bits, "palettize_bits": opts.palettize,
                                                   "weight_threshold": COREML_WEIGHT_THRESHOLD,
                                                   "accuracy_measured_in": "pytorch (same compression applied "
                                                                           "to the BN-folded torch program)"}})
    return res
