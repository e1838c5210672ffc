"""Core ML reference runner: executes a saved ``.mlpackage`` (ML Program) on Linux, op by op, with
torch kernels — coremltools can only predict on macOS.

What it reads. The package is read with coremltools' own reader (``MLModel(path,
skip_model_load=True)`` → ``milproto.load``), never by parsing protobuf here: the program's ops in
order, their attributes, and their constants — weights come from the package's own weight file
(``Data/com.apple.CoreML/weights/weight.bin``), so what runs is what was saved. Compressed weights
(``constexpr_affine_dequantize`` / ``constexpr_lut_to_dense`` of iOS16, and the iOS18
``constexpr_blockwise_shift_scale`` / ``constexpr_lut_to_dense`` / sparse ones) are decompressed
by this module's own code, once, at load time.

How it computes. Every op runs as an fp32 torch kernel (float64 only where the program declares
it); its result is then rounded to the dtype the program declares for that output: an fp16 output
becomes ``x.half().float()``, an fp32 output stays fp32, int32 / bool outputs become int32 / bool
tensors (``cast`` follows the same rule, so a cast to int32 truncates toward zero). Constants are
prepared once as torch tensors; ops whose inputs are all constants are folded once at load time;
intermediates are dropped after their last use; everything runs under ``torch.inference_mode``.

Why that matches Core ML's fp16 execution. An fp16 ML Program stores every tensor between ops in
fp16 — that is what the declared dtypes say — while the backends (CPU BNNS, GPU, Neural Engine)
accumulate inside an op (convolution and matmul sums, reductions, softmax, normalisation
statistics) in higher precision (fp32 on the CPU and GPU) and round once when the op writes its
result; the image input arrives as fp32 pixels and the program's first op casts it to fp16. Computing the op in
fp32 from the fp16-valued inputs and rounding its output to fp16 reproduces that storage rounding
exactly and the accumulation to within fp32's error. Ops the program keeps in fp32 — LITv2's
sampling grid: ``resample`` and the ops that compute its coordinates — are declared fp32, so they
stay fp32 here too.

What it does not model: rounding *inside* an op where a backend accumulates in fp16 (the Neural
Engine may, for long dot products), fused kernels that skip an intermediate fp16 store (e.g. a
conv + activation fused by the Core ML compiler: here the conv's fp16 result is rounded before the
activation), transcendental approximations of a backend (exp/erf/tanh in softmax and GELU),
flush-to-zero of fp16 subnormals, and the compute-unit split. Figures measured with it are a
reference for "the program as saved, in its declared precision", not a device measurement, and it
gives no meaningful timing.

Inputs. An image input is a N×3×H×W float32 array of 0–255 pixel values in the declared colour
layout (what Core ML hands the program after reading a pixel buffer); the ImageType's scale and
bias live in the program itself as ``mul`` / ``add`` ops named ``<input>__scaled__`` /
``<input>__biased__`` (coremltools' ``insert_image_preprocessing_ops`` pass puts them there; the
spec's image description carries only size and colour space), so running the program applies
them; :attr:`CoreMLRunner.inputs` reports them. A tensor input is given in its declared shape. A
batch larger than the program's declared batch is run one declared batch at a time and the results
are concatenated along the first axis.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...quiet import silenced
from ...errors import EdgeExportError, first_line
from . import layout  # noqa: F401  (registers its kernels)
from .base import _NUMPY_OUT, UnsupportedOp, _coercer, _ct, _dtype_name, _to_tensor
from .constexpr import _decompress, _unpack_bits  # noqa: F401  (_unpack_bits: tests)
from .ops import _IMPLS, _OpView

__all__ = ["CoreMLRunner", "UnsupportedOp", "load", "SUPPORTED_OPS"]


SUPPORTED_OPS = frozenset(set(_IMPLS) | {
    "const", "classify", "constexpr_affine_dequantize", "constexpr_cast", "constexpr_lut_to_dense",
    "constexpr_blockwise_shift_scale", "constexpr_sparse_to_dense", "constexpr_lut_to_sparse",
    "constexpr_sparse_blockwise_shift_scale"})


# --- the runner ---------------------------------------------------------------------------------

class _Step:
    __slots__ = ("fn", "refs", "outs", "round", "name", "type", "free")

    def __init__(self, fn, refs, outs, rounders, name, type_):
        self.fn, self.refs, self.outs, self.round, self.name, self.type = fn, refs, outs, rounders, name, type_
        self.free: list[str] = []


class CoreMLRunner:
    """Executes a saved ML Program with torch kernels (see the module docstring for the semantics).

    ``runner(inputs, taps=())`` takes numpy arrays keyed by input name and returns every declared
    output (a classifier: the label output as a str array, one per sample, and the probabilities as
    an (N, C) float32 array in label order) plus each requested tap (a MIL var name) as float32."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise EdgeExportError(f"Core ML package not found: {self.path}")
        ct = _ct()
        from coremltools.converters.mil.frontend.milproto import load as milload
        try:
            with silenced():
                ml = ct.models.MLModel(str(self.path), skip_model_load=True)
                spec = ml.get_spec()
        except Exception as e:  # noqa: BLE001 — a broken or foreign file
            raise EdgeExportError(f"cannot read Core ML package {self.path}: {first_line(e)}") from None
        if spec.WhichOneof("Type") != "mlProgram":
            raise EdgeExportError(f"{self.path} is a Core ML '{spec.WhichOneof('Type')}' model, not an ML Program; "
                                  "the reference runner executes ML Programs (convert_to='mlprogram') only")
        try:
            with silenced():
                prog = milload.load(spec, spec.specificationVersion, ml.weights_dir)
        except Exception as e:  # noqa: BLE001 — coremltools cannot rebuild the program
            op_type = _unknown_op_in(spec)
            if op_type is None:
                raise EdgeExportError(f"coremltools cannot read the ML Program in {self.path}: "
                                      f"{first_line(e)}") from None
            raise UnsupportedOp(op_type, _first_op_named(spec, op_type), "is not an op coremltools knows") from None
        self.spec_version = spec.specificationVersion
        self.description = spec.description
        main = prog.functions["main"]
        self._main = main
        ops = list(main.operations)
        self.op_types = collections.Counter(op.op_type for op in ops)
        self._build(ops, main)
        self._describe(spec, main, ops)

    # -- loading --

    def _build(self, ops, main):
        consts: dict[str, torch.Tensor] = {}
        np_consts: dict[str, np.ndarray] = {}
        self.var_dtypes: dict[str, str] = {}
        for name, var in main.inputs.items():
            self.var_dtypes[name] = _dtype_name(var)
        steps: list[_Step] = []
        self._classify = None
        fp16 = False
        for op in ops:
            for o in op.outputs:
                self.var_dtypes[o.name] = _dtype_name(o)
                fp16 |= self.var_dtypes[o.name] == "fp16"
            t = op.op_type
            if t == "const":
                o = op.outputs[0]
                val = o.val
                np_consts[o.name] = val
                try:
                    consts[o.name] = _to_tensor(val, self.var_dtypes[o.name])
                except (TypeError, ValueError):
                    pass   # strings, lists (classify's classes): attributes only
                continue
            if t.startswith("constexpr_"):
                vals = _decompress(op, np_consts)
                for o, val in zip(op.outputs, vals):
                    np_consts[o.name] = val
                    consts[o.name] = _to_tensor(val, self.var_dtypes[o.name])
                continue
            if t == "classify":
                classes = op.inputs["classes"]
                labels = classes.val if classes.name not in np_consts else np_consts[classes.name]
                self._classify = (op.inputs["probabilities"].name, [str(c) for c in list(labels)],
                                  op.outputs[0].name, op.outputs[1].name)
                continue
            impl = _IMPLS.get(t)
            if impl is None:
                raise UnsupportedOp(t, op.name)
            view = _OpView(op, consts, np_consts)
            fn = impl(view)
            rounders = [_coercer(self.var_dtypes[o.name]) for o in op.outputs]
            step = _Step(fn, view.refs, [o.name for o in op.outputs], rounders, op.name, t)
            if all(r in consts for r in step.refs):      # fold: every input is a constant
                with torch.inference_mode():
                    outs = self._exec(step, consts)
                for n, val in zip(step.outs, outs):
                    consts[n] = val
                    np_consts[n] = val.numpy()
                continue
            steps.append(step)
        self.precision = "fp16" if fp16 else "fp32"
        self._consts = consts
        self._steps = steps
        self._input_names = list(main.inputs)
        self._output_names = [v.name for v in main.outputs]

    @staticmethod
    def _exec(step: _Step, env: dict) -> list[torch.Tensor]:
        out = step.fn([env[r] for r in step.refs])
        if not isinstance(out, tuple):
            out = (out,)
        return [r(o) if r is not None else o for r, o in zip(step.round, out)]

    def _describe(self, spec, main, ops):
        d = spec.description
        self.classifier = self._classify is not None
        self.labels = self._classify[1] if self.classifier else None
        self.inputs: list[dict] = []
        for inp in d.input:
            kind = inp.type.WhichOneof("Type")
            var = main.inputs.get(inp.name)
            shape = [int(s) for s in var.shape] if var is not None else None
            entry = {"name": inp.name, "shape": shape, "dtype": "float32", "kind": "tensor", "color_layout": None,
                     "scale": None, "bias": None}
            if kind == "imageType":
                from coremltools.proto import FeatureTypes_pb2
                cs = FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(inp.type.imageType.colorSpace)
                layout = {"GRAYSCALE": "G", "GRAYSCALE_FLOAT16": "G_FLOAT16"}.get(cs, cs)
                entry.update(kind="image", color_layout=layout)
                scale, bias = self._preprocessing(inp.name, ops, len(shape) if shape else 4)
                entry.update(scale=scale, bias=bias)
            elif kind == "multiArrayType":
                from coremltools.proto import FeatureTypes_pb2
                dt = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(inp.type.multiArrayType.dataType)
                entry["dtype"] = {"FLOAT32": "float32", "FLOAT16": "float16", "DOUBLE": "float64",
                                  "INT32": "int32"}.get(dt, dt.lower())
            self.inputs.append(entry)
        self.outputs: list[dict] = []
        for out in d.output:
            kind = out.type.WhichOneof("Type")
            shape, dtype = None, None
            if self.classifier and out.name == self._classify[2]:
                dtype = "str"
            elif self.classifier and out.name == self._classify[3]:
                shape, dtype = [1, len(self.labels)], "float32"
                probs_var = self._var(self._classify[0])
                if probs_var is not None:
                    try:
                        s = [int(x) for x in probs_var.shape]
                        shape = [int(np.prod(s[:-1])) if len(s) > 1 else 1, s[-1]]
                    except (TypeError, ValueError):
                        pass
            else:
                var = self._var(out.name)
                if var is not None:
                    try:
                        shape = [int(x) for x in var.shape]
                    except (TypeError, ValueError):
                        shape = None
                    dtype = str(np.dtype(_NUMPY_OUT.get(self.var_dtypes.get(out.name), np.float32)))
                else:
                    dtype = kind
            self.outputs.append({"name": out.name, "shape": shape, "dtype": dtype})
        self.logits_var = None
        if self.classifier:
            name = self._classify[0]
            while True:
                var = self._var(name)
                op = var.op if var is not None else None
                if op is None:
                    break
                if op.op_type == "cast" or op.op_type == "identity":
                    name = op.inputs["x"].name
                    continue
                if op.op_type == "softmax":
                    self.logits_var = op.inputs["x"].name
                break
        self._declared_batch = {e["name"]: (e["shape"][0] if e["shape"] else None) for e in self.inputs}

    def _var(self, name):
        for op in self._main.operations:
            for o in op.outputs:
                if o.name == name:
                    return o
        return self._main.inputs.get(name)

    @staticmethod
    def _preprocessing(name: str, ops, rank: int):
        """The ImageType scale/bias, read back from the ops coremltools inserted for them."""
        scale, bias = 1.0, None
        for op in ops:
            if op.op_type == "mul" and op.name == f"{name}__scaled__":
                scale = float(np.asarray(op.inputs["y"].val).reshape(-1)[0])
            if op.op_type == "add" and op.name == f"{name}__biased__":
                bias = [float(b) for b in np.asarray(op.inputs["y"].val).reshape(-1)]
        if bias is None:
            bias = [0.0, 0.0, 0.0]
        return scale, bias

    # -- running --

    def _run_once(self, feeds: dict[str, torch.Tensor], taps: Sequence[str]) -> dict[str, torch.Tensor]:
        env = dict(self._consts)
        env.update(feeds)
        keep = set(taps) | set(self._output_names)
        if self._classify:
            keep.add(self._classify[0])
        for step in self._steps:
            outs = self._exec(step, env)
            for n, val in zip(step.outs, outs):
                env[n] = val
            for n in step.free:
                if n not in keep:
                    env.pop(n, None)
        return env

    def _plan_frees(self, taps):
        # (computed once per distinct tap set: drop each intermediate after its last use)
        key = tuple(sorted(taps))
        if getattr(self, "_freed_for", None) == key:
            return
        last: dict[str, int] = {}
        for i, s in enumerate(self._steps):
            for r in s.refs:
                if r not in self._consts:
                    last[r] = i
            for n in s.outs:
                last.setdefault(n, i)
        for s in self._steps:
            s.free = []
        for n, i in last.items():
            if n in self._consts:
                continue
            self._steps[i].free.append(n)
        self._freed_for = key

    def __call__(self, inputs: dict[str, np.ndarray], taps: Sequence[str] = ()) -> dict[str, np.ndarray]:
        taps = list(taps)
        for t in taps:
            if t not in self.var_dtypes:
                raise EdgeExportError(f"Core ML runner: no var named '{t}' in the program; tap one of the ops' "
                                      f"output names (e.g. logits_var: {self.logits_var})")
        arrays = {}
        for e in self.inputs:
            n = e["name"]
            if n not in inputs:
                raise EdgeExportError(f"Core ML runner: missing input '{n}' (the model takes: "
                                      f"{', '.join(x['name'] for x in self.inputs)})")
            a = np.asarray(inputs[n])
            want = e["shape"]
            if want and (a.ndim != len(want) or tuple(a.shape[1:]) != tuple(want[1:])):
                raise EdgeExportError(f"Core ML runner: input '{n}' has shape {tuple(a.shape)}, the model takes "
                                      f"{tuple(want)}" + (" (N×C×H×W pixel values 0–255)" if e["kind"] == "image"
                                                          else ""))
            arrays[n] = a
        n_total = next(iter(arrays.values())).shape[0] if arrays else 1
        batch = next((b for b in self._declared_batch.values() if b), n_total) or n_total
        if n_total % batch:
            raise EdgeExportError(f"Core ML runner: batch {n_total} is not a multiple of the model's batch {batch}")
        self._plan_frees(taps)
        results: list[dict] = []
        with torch.inference_mode():
            for start in range(0, n_total, batch):
                feeds = {}
                for n, a in arrays.items():
                    chunk = a[start:start + batch]
                    dt = self.var_dtypes.get(n, "fp32")
                    t = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32 if dt in ("fp16", "fp32")
                                                              else None))
                    feeds[n] = _coercer(dt)(t) if _coercer(dt) else t
                env = self._run_once(feeds, taps)
                results.append(self._collect(env, taps))
        if len(results) == 1:
            return results[0]
        return {k: np.concatenate([r[k] for r in results], axis=0) for k in results[0]}

    def _collect(self, env, taps) -> dict[str, np.ndarray]:
        out = {}
        for e in self.outputs:
            n = e["name"]
            if self._classify and n == self._classify[2]:
                p = env[self._classify[0]].float().numpy().reshape(-1, len(self.labels))
                out[n] = np.array([self.labels[i] for i in p.argmax(axis=1)], dtype=str)
            elif self._classify and n == self._classify[3]:
                out[n] = env[self._classify[0]].float().numpy().reshape(-1, len(self.labels)).astype(np.float32)
            else:
                t = env[n]
                dt = _NUMPY_OUT.get(self.var_dtypes.get(n))
                out[n] = t.numpy().astype(dt or t.numpy().dtype, copy=True)
        for t in taps:
            v = env[t]
            out[t] = v.to(torch.float32).numpy().copy() if v.dtype != torch.bool else v.numpy().astype(np.float32)
        return out

    @property
    def runtime(self) -> str:
        return f"Core ML reference runner, {self.precision} program"

    @property
    def probabilities_name(self) -> str | None:
        return self._classify[3] if self._classify else None

    def numeric(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs PyTorch's model computes too: a classifier's logits (the var that feeds its
        softmax: probabilities saturate, so parity is judged before it), else every output."""
        if not self.classifier:
            return self(inputs)
        if self.logits_var is None:
            raise EdgeExportError("Core ML runner: this classifier's probabilities do not come from a softmax; "
                                  "its logits cannot be compared with PyTorch's — export with --logits")
        return {"logits": self(inputs, taps=[self.logits_var])[self.logits_var]}

    def predict(self, inputs: dict) -> dict:
        """One sample, shaped as Core ML's ``MLModel.predict`` returns it: a classifier gives
        ``{label_name: str, probs_name: {label: float}}``; otherwise arrays. An image input may be
        a PIL image, an H×W×3 uint8 array, or a 3×H×W / 1×3×H×W float array of pixel values."""
        feeds = {}
        for e in self.inputs:
            n = e["name"]
            if n not in inputs:
                raise EdgeExportError(f"Core ML runner: missing input '{n}'")
            x = inputs[n]
            if e["kind"] == "image":
                if hasattr(x, "convert") and hasattr(x, "size"):   # PIL
                    mode = "L" if e["color_layout"] in ("G", "G_FLOAT16") else "RGB"
                    x = np.asarray(x.convert(mode), dtype=np.float32)
                    x = x[..., None] if x.ndim == 2 else x
                    if e["color_layout"] == "BGR":
                        x = x[..., ::-1]
                    x = x.transpose(2, 0, 1)
                x = np.asarray(x, dtype=np.float32)
                if x.ndim == 3 and x.shape[-1] in (1, 3) and x.shape[0] not in (1, 3):
                    x = x.transpose(2, 0, 1)
                if x.ndim == 3:
                    x = x[None]
            else:
                x = np.asarray(x)
                if e["shape"] and x.ndim == len(e["shape"]) - 1:
                    x = x[None]
            feeds[n] = x
        res = self(feeds)
        if not self.classifier:
            return res
        label_name, probs_name = self._classify[2], self._classify[3]
        probs = res[probs_name][0]
        return {label_name: str(res[label_name][0]),
                probs_name: {lab: float(p) for lab, p in zip(self.labels, probs)}}


def _unknown_op_in(spec) -> str | None:
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry
    for fn in spec.mlProgram.functions.values():
        for blk in fn.block_specializations.values():
            for op in blk.operations:
                if op.type not in ("const", "write_state") and op.type not in SSAOpRegistry.core_ops:
                    return op.type
    return None


def _first_op_named(spec, op_type: str) -> str:
    for fn in spec.mlProgram.functions.values():
        for blk in fn.block_specializations.values():
            for op in blk.operations:
                if op.type == op_type:
                    return op.outputs[0].name if op.outputs else "?"
    return "?"


def load(path: str | Path) -> CoreMLRunner:
    """The Core ML reference runner for a saved ``.mlpackage``."""
    return CoreMLRunner(path)
