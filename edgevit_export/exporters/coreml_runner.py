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
import contextlib
import io
import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CannotRun, EdgeExportError, first_line

__all__ = ["CoreMLRunner", "UnsupportedOp", "load", "SUPPORTED_OPS"]


class UnsupportedOp(CannotRun):
    """An op of the program that this runner cannot execute (one line: op type and op name)."""

    def __init__(self, op_type: str, op_name: str, why: str = "is not implemented"):
        self.op_type, self.op_name = op_type, op_name
        super().__init__(f"Core ML runner: op '{op_type}' (at op '{op_name}') {why}; the reference runner "
                         f"cannot execute this program (run it on macOS with coremltools, or add the op to "
                         f"edgevit_export/exporters/coreml_runner.py)")


def _ct():
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto import load as _milload  # noqa: F401
    return ct


# --- dtypes -------------------------------------------------------------------------------------

_TORCH_DTYPE = {
    "fp16": torch.float32, "fp32": torch.float32, "fp64": torch.float64,
    "int32": torch.int32, "int64": torch.int64, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "uint16": torch.int32, "uint32": torch.int64, "uint64": torch.int64,
    "int4": torch.int8, "uint4": torch.uint8, "uint2": torch.uint8, "uint1": torch.uint8,
    "uint3": torch.uint8, "uint6": torch.uint8, "bool": torch.bool,
}
_NUMPY_OUT = {"fp16": np.float32, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "int64": np.int64,
              "bool": np.bool_}


def _dtype_name(var) -> str:
    from coremltools.converters.mil.mil import types
    try:
        t = var.dtype
    except ValueError:
        return "list"
    try:
        return types.builtin_to_string(t)
    except Exception:
        return str(t)


def _coercer(name: str) -> Callable | None:
    """The function that rounds an op's result to its declared dtype (None: leave as is)."""
    if name == "fp16":
        def r16(t):
            if not t.is_floating_point():
                t = t.to(torch.float32)
            return t.to(torch.float16).to(torch.float32)
        return r16
    td = _TORCH_DTYPE.get(name)
    if td is None:
        return None

    def rc(t):
        return t if t.dtype == td else t.to(td)
    return rc


def _to_tensor(val, dtype_name: str) -> torch.Tensor:
    a = np.asarray(val)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    td = _TORCH_DTYPE.get(dtype_name)
    if a.dtype.kind in "US":
        raise TypeError("string constant")
    if a.dtype == np.uint16:
        a = a.astype(np.int32)
    elif a.dtype in (np.uint32, np.uint64):
        a = a.astype(np.int64)
    t = torch.from_numpy(np.ascontiguousarray(a).copy())
    if td is not None and t.dtype != td:
        t = t.to(td)
    return t


# --- op view: what an op implementation sees at prepare time ----------------------------------------

class _OpView:
    """An op's inputs at prepare time: ``val`` reads a constant attribute (numpy / Python value),
    ``arg`` registers a runtime input and returns its position in the kernel's argument list."""

    def __init__(self, op, consts: dict, np_consts: dict):
        self.op = op
        self.type = op.op_type
        self.name = op.name
        self._consts = consts
        self._np = np_consts
        self.refs: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.op.inputs and self.op.inputs[key] is not None

    def var(self, key: str):
        return self.op.inputs[key]

    def is_const(self, key: str) -> bool:
        v = self.op.inputs.get(key)
        if v is None:
            return False
        if isinstance(v, (tuple, list)):
            return all(x.name in self._np for x in v)
        return v.name in self._np

    def val(self, key: str, default=None):
        v = self.op.inputs.get(key)
        if v is None:
            return default
        if isinstance(v, (tuple, list)):
            return [self._const_of(x, key) for x in v]
        return self._const_of(v, key)

    def _const_of(self, v, key):
        if v.name in self._np:
            return self._np[v.name]
        raise UnsupportedOp(self.type, self.name, f"has a non-constant '{key}' (dynamic attributes are not supported)")

    def arg(self, key: str) -> int:
        v = self.op.inputs[key]
        self.refs.append(v.name)
        return len(self.refs) - 1

    def args(self, key: str) -> list[int]:
        v = self.op.inputs[key]
        vs = v if isinstance(v, (tuple, list)) else (v,)
        out = []
        for x in vs:
            self.refs.append(x.name)
            out.append(len(self.refs) - 1)
        return out

    def in_shape(self, key: str) -> tuple | None:
        v = self.op.inputs[key]
        try:
            s = tuple(int(d) for d in v.shape)
        except (TypeError, ValueError):
            return None
        return s

    def out_shape(self, i: int = 0) -> tuple | None:
        try:
            return tuple(int(d) for d in self.op.outputs[i].shape)
        except (TypeError, ValueError):
            return None

    def unsupported(self, why: str) -> UnsupportedOp:
        return UnsupportedOp(self.type, self.name, why)


_IMPLS: dict[str, Callable[[_OpView], Callable]] = {}


def _op(*names):
    def deco(fn):
        for n in names:
            _IMPLS[n] = fn
        return fn
    return deco


def _axis(a, rank):
    a = int(a)
    return a + rank if a < 0 else a


# --- elementwise --------------------------------------------------------------------------------

_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "floor_div": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    "mod": torch.remainder,
    "equal": torch.eq, "not_equal": torch.ne, "greater": torch.gt, "greater_equal": torch.ge,
    "less": torch.lt, "less_equal": torch.le,
    "logical_and": torch.logical_and, "logical_or": torch.logical_or, "logical_xor": torch.logical_xor,
}


def _real_div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="floor")   # MIL: integer real_div is floor division
    return torch.div(a, b)


def _binary_impl(v: _OpView):
    f = _real_div if v.type == "real_div" else _BINARY[v.type]
    ix, iy = v.arg("x"), v.arg("y")

    def run(a):
        x, y = a[ix], a[iy]
        if v.type in ("maximum", "minimum") and x.dtype != y.dtype:
            y = y.to(x.dtype) if x.is_floating_point() or not y.is_floating_point() else y
            x = x.to(y.dtype)
        return f(x, y)
    return run


for _n in list(_BINARY) + ["real_div"]:
    _IMPLS[_n] = _binary_impl


_UNARY = {
    "abs": torch.abs, "acos": torch.acos, "asin": torch.asin, "atan": torch.atan, "atanh": torch.atanh,
    "ceil": torch.ceil, "cos": torch.cos, "cosh": torch.cosh, "erf": torch.erf, "exp": torch.exp,
    "exp2": torch.exp2, "floor": torch.floor, "round": torch.round, "sign": torch.sign, "sin": torch.sin,
    "sinh": torch.sinh, "sqrt": torch.sqrt, "square": torch.square, "tan": torch.tan, "tanh": torch.tanh,
    "relu": torch.relu, "relu6": lambda x: torch.clamp(x, 0.0, 6.0), "sigmoid": torch.sigmoid,
    "silu": F.silu, "softplus": F.softplus, "softsign": F.softsign,
    "logical_not": torch.logical_not, "identity": lambda x: x,
}


@_op(*_UNARY)
def _unary(v):
    f = _UNARY[v.type]
    i = v.arg("x")
    return lambda a: f(a[i])


@_op("cast")
def _cast(v):
    i = v.arg("x")   # the declared output dtype does the conversion
    return lambda a: a[i]


_EPSILON_OPS = {"inverse": (torch.reciprocal, 1e-4), "rsqrt": (torch.rsqrt, 1e-12), "log": (torch.log, 1e-45)}


@_op(*_EPSILON_OPS)
def _with_epsilon(v):
    """f(x + epsilon), with each op's default epsilon."""
    fn, default = _EPSILON_OPS[v.type]
    i = v.arg("x")
    eps = float(v.val("epsilon", default))
    return lambda a: fn(a[i] + eps)


@_op("clip")
def _clip(v):
    i = v.arg("x")
    lo, hi = float(v.val("alpha")), float(v.val("beta"))
    return lambda a: torch.clamp(a[i], lo, hi)


@_op("threshold")
def _threshold(v):
    i = v.arg("x")
    al = float(v.val("alpha"))
    return lambda a: torch.clamp(a[i], min=al)


# --- activations --------------------------------------------------------------------------------

@_op("gelu")
def _gelu(v):
    i = v.arg("x")
    mode = str(v.val("mode", "EXACT"))
    if mode == "EXACT":
        return lambda a: F.gelu(a[i])
    if mode == "TANH_APPROXIMATION":
        return lambda a: F.gelu(a[i], approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return lambda a: a[i] * torch.sigmoid(1.702 * a[i])
    raise v.unsupported(f"has unknown mode '{mode}'")


@_op("sigmoid_hard")
def _sigmoid_hard(v):
    i = v.arg("x")
    al, be = float(v.val("alpha", 0.2)), float(v.val("beta", 0.5))
    return lambda a: torch.clamp(a[i] * al + be, 0.0, 1.0)


@_op("leaky_relu")
def _leaky(v):
    i = v.arg("x")
    al = float(v.val("alpha", 0.01))
    return lambda a: F.leaky_relu(a[i], al)


@_op("elu")
def _elu(v):
    i = v.arg("x")
    al = float(v.val("alpha", 1.0))
    return lambda a: F.elu(a[i], al)


@_op("thresholded_relu")
def _trelu(v):
    i = v.arg("x")
    al = float(v.val("alpha", 1.0))
    return lambda a: torch.where(a[i] >= al, a[i], torch.zeros((), dtype=a[i].dtype))   # as value_inference


@_op("scaled_tanh")
def _stanh(v):
    i = v.arg("x")
    al, be = float(v.val("alpha", 1.0)), float(v.val("beta", 1.0))
    return lambda a: al * torch.tanh(be * a[i])


@_op("linear_activation")
def _lin_act(v):
    i = v.arg("x")
    al, be = float(v.val("alpha", 1.0)), float(v.val("beta", 0.0))
    return lambda a: a[i] * al + be


@_op("clamped_relu")
def _clamped_relu(v):
    i = v.arg("x")
    al, be = float(v.val("alpha", 0.0)), float(v.val("beta", 6.0))
    return lambda a: torch.clamp_max(torch.where(a[i] >= 0, a[i], a[i] * al), be)


@_op("softplus_parametric")
def _softplus_p(v):
    i = v.arg("x")
    al = torch.as_tensor(np.asarray(v.val("alpha"), np.float32))
    be = torch.as_tensor(np.asarray(v.val("beta"), np.float32))

    def run(a):
        x = a[i]
        shape = [1, -1] + [1] * (x.dim() - 2)
        return al.reshape(shape) * F.softplus(be.reshape(shape) * x)
    return run


@_op("prelu")
def _prelu(v):
    i = v.arg("x")
    al = torch.as_tensor(np.asarray(v.val("alpha"), np.float32))
    return lambda a: F.prelu(a[i], al)


@_op("softmax")
def _softmax(v):
    i = v.arg("x")
    ax = int(v.val("axis", -1))
    return lambda a: torch.softmax(a[i], dim=ax)


# --- linear algebra -----------------------------------------------------------------------------

@_op("linear")
def _linear(v):
    ix, iw = v.arg("x"), v.arg("weight")
    ib = v.arg("bias") if v.has("bias") else None
    return lambda a: F.linear(a[ix], a[iw], None if ib is None else a[ib])


@_op("matmul")
def _matmul(v):
    ix, iy = v.arg("x"), v.arg("y")
    tx, ty = bool(v.val("transpose_x", False)), bool(v.val("transpose_y", False))

    def run(a):
        x, y = a[ix], a[iy]
        if tx and x.dim() >= 2:
            x = x.transpose(-1, -2)
        if ty and y.dim() >= 2:
            y = y.transpose(-1, -2)
        return torch.matmul(x, y)
    return run


@_op("einsum")
def _einsum(v):
    idx = v.args("values")
    eq = str(v.val("equation"))
    return lambda a: torch.einsum(eq, *[a[i] for i in idx])


# --- convolution and pooling ------------------------------------------------------------------------

def _spatial_pads(pad_type: str, in_sp, k_eff, strides, custom) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim for MIL's pad_type."""
    pads = []
    for d, (n, k, s) in enumerate(zip(in_sp, k_eff, strides)):
        if pad_type == "custom":
            pads.append((int(custom[2 * d]), int(custom[2 * d + 1])))
        elif pad_type == "valid":
            pads.append((0, 0))
        elif pad_type in ("same", "same_lower"):
            out = math.ceil(n / s)
            total = max((out - 1) * s + k - n, 0)
            small = total // 2
            pads.append((small, total - small) if pad_type == "same" else (total - small, small))
        else:
            raise ValueError(pad_type)
    return pads


def _torch_pad_arg(pads: list[tuple[int, int]]) -> list[int]:
    out = []
    for b, e in reversed(pads):
        out += [b, e]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@_op("conv")
def _conv(v):
    ix, iw = v.arg("x"), v.arg("weight")
    ib = v.arg("bias") if v.has("bias") else None
    xs, ws = v.in_shape("x"), v.in_shape("weight")
    if xs is None or ws is None:
        raise v.unsupported("has a dynamic input shape")
    nsp = len(xs) - 2
    if nsp not in _CONV:
        raise v.unsupported(f"has {nsp} spatial dims")
    strides = [int(s) for s in v.val("strides", [1] * nsp)]
    dil = [int(d) for d in v.val("dilations", [1] * nsp)]
    groups = int(v.val("groups", 1))
    pad_type = str(v.val("pad_type", "valid"))
    k_eff = [(k - 1) * d + 1 for k, d in zip(ws[2:], dil)]
    pads = _spatial_pads(pad_type, xs[2:], k_eff, strides, v.val("pad", [0] * 2 * nsp))
    conv = _CONV[nsp]
    if all(b == e for b, e in pads):
        padding, pre = [b for b, _ in pads], None
    else:
        padding, pre = 0, _torch_pad_arg(pads)

    def run(a):
        x = a[ix]
        if pre is not None:
            x = F.pad(x, pre)
        return conv(x, a[iw], None if ib is None else a[ib], strides, padding, dil, groups)
    return run


@_op("conv_transpose")
def _conv_transpose(v):
    ix, iw = v.arg("x"), v.arg("weight")
    ib = v.arg("bias") if v.has("bias") else None
    xs, ws, os_ = v.in_shape("x"), v.in_shape("weight"), v.out_shape()
    if xs is None or ws is None or os_ is None:
        raise v.unsupported("has a dynamic shape")
    nsp = len(xs) - 2
    strides = [int(s) for s in v.val("strides", [1] * nsp)]
    dil = [int(d) for d in v.val("dilations", [1] * nsp)]
    groups = int(v.val("groups", 1))
    pad_type = str(v.val("pad_type", "valid"))
    custom = v.val("pad", [0] * 2 * nsp)
    convt = _CONVT[nsp]
    full = [(n - 1) * s + (k - 1) * d + 1 for n, s, k, d in zip(xs[2:], strides, ws[2:], dil)]
    crops = []
    for d in range(nsp):
        want = os_[2 + d]
        if pad_type == "custom":
            begin = int(custom[2 * d])
        elif pad_type in ("same", "same_lower"):
            total = max(full[d] - want, 0)
            begin = total // 2 if pad_type == "same" else total - total // 2
        else:
            begin = 0
        crops.append((begin, want))

    def run(a):
        y = convt(a[ix], a[iw], None, strides, 0, 0, groups, dil)
        for d, (begin, want) in enumerate(crops):
            ax = 2 + d
            n = y.shape[ax]
            if begin + want > n:
                pad = [0, 0] * (y.dim() - ax - 1) + [0, begin + want - n]
                y = F.pad(y, pad)
            if begin != 0 or want != y.shape[ax]:
                y = y.narrow(ax, begin, want)
        if ib is not None:
            y = y + a[ib].reshape([1, -1] + [1] * nsp)
        return y
    return run


@_op("avg_pool", "max_pool", "l2_pool")
def _pool(v):
    ix = v.arg("x")
    xs, os_ = v.in_shape("x"), v.out_shape()
    if xs is None or os_ is None:
        raise v.unsupported("has a dynamic shape")
    ks = [int(k) for k in v.val("kernel_sizes")]
    nsp = len(ks)
    strides = [int(s) for s in v.val("strides", [1] * nsp)]
    pad_type = str(v.val("pad_type", "valid"))
    exclude = bool(v.val("exclude_padding_from_average", False))
    pads = _spatial_pads(pad_type, xs[2:], ks, strides, v.val("pad", [0] * 2 * nsp))
    # extra padding at the end where the declared output needs it (ceil_mode): never counted
    extra = []
    for d in range(nsp):
        need = (os_[2 + d] - 1) * strides[d] + ks[d]
        have = xs[2 + d] + pads[d][0] + pads[d][1]
        extra.append(max(need - have, 0))
    kind = v.type
    pad_arg = _torch_pad_arg(pads)
    full_arg = _torch_pad_arg([(b, e + x) for (b, e), x in zip(pads, extra)])
    any_pad = any(full_arg)
    pool_avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nsp]
    pool_max = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nsp]
    div = None
    if kind == "avg_pool" and any_pad:
        ones = torch.ones((1, 1) + tuple(xs[2:]))
        # the divisor per output position: padded cells count unless excluded; ceil-mode cells never
        counted = F.pad(ones, pad_arg, value=0.0 if exclude else 1.0)
        counted = F.pad(counted, _torch_pad_arg([(0, x) for x in extra]), value=0.0)
        div = pool_avg(counted, ks, strides) * float(np.prod(ks))

    def run(a):
        x = a[ix]
        if kind == "max_pool":
            if any_pad:
                x = F.pad(x, full_arg, value=-math.inf)
            return pool_max(x, ks, strides)
        if kind == "l2_pool":
            x2 = x * x
            if any_pad:
                x2 = F.pad(x2, full_arg)
            return torch.sqrt(pool_avg(x2, ks, strides) * float(np.prod(ks)))
        if not any_pad:
            return pool_avg(x, ks, strides)
        s = pool_avg(F.pad(x, full_arg), ks, strides) * float(np.prod(ks))
        return s / div
    return run


# --- normalisation ------------------------------------------------------------------------------

@_op("batch_norm")
def _batch_norm(v):
    ix, im, iv = v.arg("x"), v.arg("mean"), v.arg("variance")
    ig = v.arg("gamma") if v.has("gamma") else None
    ib = v.arg("beta") if v.has("beta") else None
    eps = float(v.val("epsilon", 1e-5))
    return lambda a: F.batch_norm(a[ix], a[im], a[iv], None if ig is None else a[ig],
                                  None if ib is None else a[ib], False, 0.0, eps)


@_op("instance_norm")
def _instance_norm(v):
    ix = v.arg("x")
    ig = v.arg("gamma") if v.has("gamma") else None
    ib = v.arg("beta") if v.has("beta") else None
    eps = float(v.val("epsilon", 1e-5))
    return lambda a: F.instance_norm(a[ix], weight=None if ig is None else a[ig],
                                     bias=None if ib is None else a[ib], eps=eps)


@_op("layer_norm")
def _layer_norm(v):
    ix = v.arg("x")
    ig = v.arg("gamma") if v.has("gamma") else None
    ib = v.arg("beta") if v.has("beta") else None
    eps = float(v.val("epsilon", 1e-5))
    xs = v.in_shape("x")
    rank = len(xs)
    axes = v.val("axes")
    axes = sorted(_axis(x, rank) for x in (range(rank) if axes is None else np.asarray(axes).reshape(-1)))
    trailing = axes == list(range(rank - len(axes), rank))
    if trailing:
        norm_shape = [xs[d] for d in axes]
        return lambda a: F.layer_norm(a[ix], norm_shape, None if ig is None else a[ig].reshape(norm_shape),
                                      None if ib is None else a[ib].reshape(norm_shape), eps)
    bshape = [xs[d] if d in axes else 1 for d in range(rank)]

    def run(a):
        x = a[ix]
        var, mean = torch.var_mean(x, dim=axes, keepdim=True, correction=0)
        y = (x - mean) * torch.rsqrt(var + eps)
        if ig is not None:
            y = y * a[ig].reshape(bshape)
        if ib is not None:
            y = y + a[ib].reshape(bshape)
        return y
    return run


@_op("l2_norm")
def _l2_norm(v):
    ix = v.arg("x")
    eps = float(v.val("epsilon", 1e-6))
    rank = len(v.in_shape("x"))
    axes = list(range(max(rank - 3, 0), rank))

    def run(a):
        x = a[ix]
        return x / torch.sqrt(torch.sum(x * x, dim=axes, keepdim=True) + eps)
    return run


# --- reductions ---------------------------------------------------------------------------------

def _reduce_axes(v):
    rank = len(v.in_shape("x"))
    axes = v.val("axes")
    if axes is None:
        return list(range(rank))
    return sorted(_axis(x, rank) for x in np.asarray(axes).reshape(-1))


_REDUCE = {
    "reduce_mean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "reduce_sum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "reduce_max": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "reduce_min": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "reduce_prod": lambda x, d, k: _prod(x, d, k),
    "reduce_sum_square": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "reduce_l1_norm": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "reduce_l2_norm": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "reduce_log_sum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "reduce_log_sum_exp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


@_op(*_REDUCE)
def _reduce(v):
    ix = v.arg("x")
    dims = _reduce_axes(v)
    keep = bool(v.val("keep_dims", False))
    f = _REDUCE[v.type]
    return lambda a: f(a[ix], dims, keep)


@_op("reduce_argmax", "reduce_argmin")
def _argreduce(v):
    ix = v.arg("x")
    rank = len(v.in_shape("x"))
    ax = _axis(v.val("axis", -1), rank)
    keep = bool(v.val("keep_dims", False))
    f = torch.argmax if v.type == "reduce_argmax" else torch.argmin
    return lambda a: f(a[ix], dim=ax, keepdim=keep)


# --- tensor layout ------------------------------------------------------------------------------

@_op("reshape")
def _reshape(v):
    ix = v.arg("x")
    xs = v.in_shape("x")
    if v.is_const("shape"):
        shape = [int(s) for s in np.asarray(v.val("shape")).reshape(-1)]
        if xs is not None and len(shape) == len(xs):
            shape = [xs[d] if s == 0 else s for d, s in enumerate(shape)]
        return lambda a: torch.reshape(a[ix], shape)
    ishape = v.arg("shape")

    def run(a):
        x = a[ix]
        shape = [int(s) for s in a[ishape].reshape(-1).tolist()]
        if len(shape) == x.dim():
            shape = [x.shape[d] if s == 0 else s for d, s in enumerate(shape)]
        return torch.reshape(x, shape)
    return run


@_op("transpose")
def _transpose(v):
    ix = v.arg("x")
    perm = [int(p) for p in np.asarray(v.val("perm")).reshape(-1)]
    return lambda a: a[ix].permute(perm)


@_op("squeeze")
def _squeeze(v):
    ix = v.arg("x")
    axes = v.val("axes")
    if axes is None:
        return lambda a: torch.squeeze(a[ix])
    rank = len(v.in_shape("x"))
    dims = tuple(_axis(x, rank) for x in np.asarray(axes).reshape(-1))
    return lambda a: torch.squeeze(a[ix], dim=dims)


@_op("expand_dims")
def _expand_dims(v):
    ix = v.arg("x")
    rank = len(v.in_shape("x"))
    axes = [int(x) for x in np.asarray(v.val("axes")).reshape(-1)]
    out_rank = rank + len(axes)
    dims = sorted(x + out_rank if x < 0 else x for x in axes)

    def run(a):
        x = a[ix]
        for d in dims:
            x = x.unsqueeze(d)
        return x
    return run


@_op("concat")
def _concat(v):
    idx = v.args("values")
    first = v.var("values")[0]
    rank = len(first.shape)
    ax = _axis(v.val("axis"), max(rank, 1))
    inter = bool(v.val("interleave", False))
    if inter:
        def run_i(a):
            xs = [a[i] for i in idx]
            st = torch.stack(xs, dim=ax + 1)
            shape = list(xs[0].shape)
            shape[ax] *= len(xs)
            return st.reshape(shape)
        return run_i
    return lambda a: torch.cat([a[i] if a[i].dim() else a[i].reshape(1) for i in idx], dim=ax)


@_op("stack")
def _stack(v):
    idx = v.args("values")
    ax = int(v.val("axis"))
    return lambda a: torch.stack([a[i] for i in idx], dim=ax)


@_op("split")
def _split(v):
    ix = v.arg("x")
    xs = v.in_shape("x")
    ax = _axis(v.val("axis"), len(xs))
    if v.has("split_sizes"):
        sizes = [int(s) for s in np.asarray(v.val("split_sizes")).reshape(-1)]
    else:
        n = int(v.val("num_splits"))
        sizes = [xs[ax] // n] * n
    return lambda a: tuple(torch.split(a[ix], sizes, dim=ax))


def _python_slices(shape, begin, end, stride, bmask, emask, smask):
    """Per axis (start, stop, step) as numpy would slice, plus the axes to squeeze."""
    rank = len(shape)
    stride = [1] * rank if stride is None else [int(s) for s in stride]
    bmask = [False] * rank if bmask is None else [bool(b) for b in bmask]
    emask = [False] * rank if emask is None else [bool(b) for b in emask]
    smask = [False] * rank if smask is None else [bool(b) for b in smask]
    out, squeeze = [], []
    for d in range(rank):
        b = None if bmask[d] else int(begin[d])
        e = None if emask[d] else int(end[d])
        s = stride[d]
        if smask[d]:
            e, s = None, np.iinfo(np.int32).max
            squeeze.append(d)
        out.append(slice(b, e, s).indices(shape[d]))
    return out, squeeze


def _apply_slices(x, slices, squeeze):
    for d, (start, stop, step) in enumerate(slices):
        n = x.shape[d]
        if step > 0:
            if start == 0 and stop >= n and step == 1:
                continue
            if stop <= start:
                x = x.narrow(d, 0, 0)
                continue
            x = x.narrow(d, start, stop - start)
            if step > 1:
                x = x[(slice(None),) * d + (slice(None, None, step),)]
        else:
            idx = torch.arange(start, stop, step, dtype=torch.long)
            x = x.index_select(d, idx)
    if squeeze:
        x = x.squeeze(tuple(squeeze)) if len(squeeze) > 1 else x.squeeze(squeeze[0])
    return x


@_op("slice_by_index")
def _slice_by_index(v):
    ix = v.arg("x")
    xs = v.in_shape("x")
    rank = len(xs)
    begin = np.asarray(v.val("begin")).reshape(-1)
    end = np.asarray(v.val("end")).reshape(-1)
    stride = v.val("stride")
    slices, squeeze = _python_slices(xs, begin, end, None if stride is None else np.asarray(stride).reshape(-1),
                                     v.val("begin_mask"), v.val("end_mask"), v.val("squeeze_mask"))
    assert len(slices) == rank
    return lambda a: _apply_slices(a[ix], slices, squeeze)


@_op("slice_by_size")
def _slice_by_size(v):
    ix = v.arg("x")
    xs = v.in_shape("x")
    begin = [int(b) for b in np.asarray(v.val("begin")).reshape(-1)]
    size = [int(s) for s in np.asarray(v.val("size")).reshape(-1)]
    slices = []
    for d, (b, s) in enumerate(zip(begin, size)):
        b = b + xs[d] if b < 0 else b
        slices.append((b, xs[d] if s == -1 else b + s, 1))
    return lambda a: _apply_slices(a[ix], slices, [])


@_op("crop")
def _crop(v):
    ix = v.arg("x")
    xs = v.in_shape("x")
    ch = [int(c) for c in np.asarray(v.val("crop_height")).reshape(-1)]
    cw = [int(c) for c in np.asarray(v.val("crop_width")).reshape(-1)]
    r = len(xs)
    slices = [(0, n, 1) for n in xs[:-2]] + [(ch[0], xs[-2] - ch[1], 1), (cw[0], xs[-1] - cw[1], 1)]
    assert len(slices) == r
    return lambda a: _apply_slices(a[ix], slices, [])


@_op("tile")
def _tile(v):
    ix = v.arg("x")
    reps = [int(r) for r in np.asarray(v.val("reps")).reshape(-1)]
    return lambda a: a[ix].repeat(reps)


@_op("pad")
def _pad(v):
    ix = v.arg("x")
    pad = [int(p) for p in np.asarray(v.val("pad")).reshape(-1)]
    mode = str(v.val("mode", "constant"))
    cval = float(v.val("constant_val", 0.0))
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]
    arg = _torch_pad_arg(pairs)
    n = len(pairs)
    tmode = {"constant": "constant", "reflect": "reflect", "replicate": "replicate"}.get(mode)
    if tmode is None:
        raise v.unsupported(f"has unknown mode '{mode}'")
    if tmode == "constant":
        return lambda a: F.pad(a[ix], arg, value=cval)

    def run(a):
        x = a[ix]
        # torch pads the last 1-3 dims of a batched tensor in these modes: trim zero pairs, add dims
        keep = n
        while keep > 0 and pairs[len(pairs) - keep] == (0, 0):
            keep -= 1
        if keep == 0:
            return x
        sub = _torch_pad_arg(pairs[len(pairs) - keep:])
        lead = x.shape[:x.dim() - keep]
        y = x.reshape((1, -1) + tuple(x.shape[x.dim() - keep:]))
        y = F.pad(y, sub, mode=tmode)
        return y.reshape(tuple(lead) + tuple(y.shape[2:]))
    return run


@_op("gather")
def _gather(v):
    ix, ii = v.arg("x"), v.arg("indices")
    xs = v.in_shape("x")
    ax = _axis(v.val("axis", 0), len(xs))
    if int(v.val("batch_dims", 0)) != 0:
        raise v.unsupported("has batch_dims != 0")

    def run(a):
        x, idx = a[ix], a[ii].long()
        n = x.shape[ax]
        idx = torch.where(idx < 0, idx + n, idx)
        out = x.index_select(ax, idx.reshape(-1))
        return out.reshape(tuple(x.shape[:ax]) + tuple(idx.shape) + tuple(x.shape[ax + 1:]))
    return run


@_op("gather_along_axis")
def _gather_along_axis(v):
    ix, ii = v.arg("x"), v.arg("indices")
    ax = _axis(v.val("axis", 0), len(v.in_shape("x")))

    def run(a):
        x, idx = a[ix], a[ii].long()
        idx = torch.where(idx < 0, idx + x.shape[ax], idx)
        return torch.gather(x, ax, idx)
    return run


@_op("gather_nd")
def _gather_nd(v):
    ix, ii = v.arg("x"), v.arg("indices")
    if int(v.val("batch_dims", 0)) != 0:
        raise v.unsupported("has batch_dims != 0")

    def run(a):
        x, idx = a[ix], a[ii].long()
        return x[tuple(idx[..., k] for k in range(idx.shape[-1]))]
    return run


@_op("select")
def _select(v):
    ic, ia, ib = v.arg("cond"), v.arg("a"), v.arg("b")
    return lambda a: torch.where(a[ic].bool(), a[ia], a[ib])


@_op("fill")
def _fill(v):
    shape = [int(s) for s in np.asarray(v.val("shape")).reshape(-1)]
    value = v.val("value", 0.0)
    return lambda a: torch.full(shape, float(value) if np.asarray(value).dtype.kind == "f" else int(value))


@_op("fill_like")
def _fill_like(v):
    ix = v.arg("ref_tensor")
    value = float(v.val("value", 0.0))
    return lambda a: torch.full(a[ix].shape, value)


@_op("range_1d")
def _range_1d(v):
    ie, is_, ip = v.arg("end"), v.arg("start"), v.arg("step")
    return lambda a: torch.arange(a[is_].item(), a[ie].item(), a[ip].item())


@_op("shape")
def _shape(v):
    ix = v.arg("x")
    return lambda a: torch.tensor(list(a[ix].shape), dtype=torch.int32)


@_op("flatten2d")
def _flatten2d(v):
    ix = v.arg("x")
    rank = len(v.in_shape("x"))
    ax = _axis(v.val("axis", 1), rank)
    return lambda a: a[ix].reshape(int(np.prod(a[ix].shape[:ax])), -1)


@_op("reverse")
def _reverse(v):
    ix = v.arg("x")
    rank = len(v.in_shape("x"))
    axes = v.val("axes")
    dims = list(range(rank)) if axes is None else [_axis(x, rank) for x in np.asarray(axes).reshape(-1)]
    return lambda a: torch.flip(a[ix], dims)


@_op("cumsum")
def _cumsum(v):
    ix = v.arg("x")
    ax = _axis(v.val("axis", 0), len(v.in_shape("x")))
    excl, rev = bool(v.val("exclusive", False)), bool(v.val("reverse", False))

    def run(a):
        x = a[ix]
        if rev:
            x = torch.flip(x, [ax])
        y = torch.cumsum(x, dim=ax)
        if excl:
            y = y - x
        return torch.flip(y, [ax]) if rev else y
    return run


@_op("band_part")
def _band_part(v):
    ix = v.arg("x")
    lo, hi = int(v.val("lower", -1)), int(v.val("upper", -1))

    def run(a):
        x = a[ix]
        m, n = x.shape[-2], x.shape[-1]
        i = torch.arange(m).reshape(-1, 1)
        j = torch.arange(n).reshape(1, -1)
        keep = torch.ones(m, n, dtype=torch.bool)
        if lo >= 0:
            keep &= (i - j) <= lo
        if hi >= 0:
            keep &= (j - i) <= hi
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype))
    return run


@_op("pixel_shuffle")
def _pixel_shuffle(v):
    ix = v.arg("x")
    r = int(v.val("upscale_factor"))
    return lambda a: F.pixel_shuffle(a[ix], r)


@_op("pixel_unshuffle")
def _pixel_unshuffle(v):
    ix = v.arg("x")
    r = int(v.val("downscale_factor"))
    return lambda a: F.pixel_unshuffle(a[ix], r)


@_op("depth_to_space")
def _depth_to_space(v):
    ix = v.arg("x")
    bs = int(v.val("block_size"))

    def run(a):   # DCR order (TensorFlow's)
        x = a[ix]
        n, c, h, w = x.shape
        y = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (bs * bs), h * bs, w * bs)
    return run


@_op("space_to_depth")
def _space_to_depth(v):
    ix = v.arg("x")
    bs = int(v.val("block_size"))

    def run(a):
        x = a[ix]
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * bs * bs, h // bs, w // bs)
    return run


# --- resizing and sampling --------------------------------------------------------------------------

def _src_coords(n_in: int, n_out: int, mode: str, scale: float | None = None) -> np.ndarray:
    """Source coordinate of every output index along one axis, for MIL's bilinear modes."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "align_corners"):
        if n_out == 1:
            c = np.zeros(1)
        else:
            c = i * (n_in - 1) / (n_out - 1)
    elif mode == "DEFAULT":
        c = i * ((n_in - n_in / n_out) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        c = 0.5 * delta + i * delta
    elif mode in ("UNALIGN_CORNERS", "half_pixel"):
        sp = (1.0 / scale) if scale else n_in / n_out
        c = (i + 0.5) * sp - 0.5
    elif mode == "asymmetric":
        sp = (1.0 / scale) if scale else n_in / n_out
        c = i * sp
    else:
        raise ValueError(mode)
    return np.clip(c, 0, n_in - 1)


def _linear_along(x: torch.Tensor, dim: int, coords: np.ndarray) -> torch.Tensor:
    i0 = np.floor(coords).astype(np.int64)
    i1 = np.minimum(i0 + 1, x.shape[dim] - 1)
    w = torch.from_numpy((coords - i0).astype(np.float32))
    shape = [1] * x.dim()
    shape[dim] = -1
    w = w.reshape(shape)
    a = x.index_select(dim, torch.from_numpy(i0))
    b = x.index_select(dim, torch.from_numpy(i1))
    return a + (b - a) * w


def _bilinear_impl(v, modes):
    ix = v.arg("x")
    xs, os_ = v.in_shape("x"), v.out_shape()
    ch = _src_coords(xs[-2], os_[-2], modes[0][0], modes[0][1])
    cw = _src_coords(xs[-1], os_[-1], modes[1][0], modes[1][1])
    return lambda a: _linear_along(_linear_along(a[ix], a[ix].dim() - 2, ch), a[ix].dim() - 1, cw)


@_op("upsample_bilinear")
def _upsample_bilinear(v):
    sh, sw = float(v.val("scale_factor_height", 1)), float(v.val("scale_factor_width", 1))
    ac = bool(v.val("align_corners", True))
    hpc = v.val("half_pixel_centers")
    hpc = (not ac) if hpc is None else bool(hpc)
    if ac:
        m = "align_corners"
    else:
        m = "half_pixel" if hpc else "asymmetric"
    return _bilinear_impl(v, [(m, sh), (m, sw)])


@_op("resize_bilinear")
def _resize_bilinear(v):
    m = str(v.val("sampling_mode", "DEFAULT"))
    return _bilinear_impl(v, [(m, None), (m, None)])


def _nearest_index(n_in: int, n_out: int, scale: float | None) -> torch.Tensor:
    sp = (1.0 / scale) if scale else n_in / n_out
    return torch.from_numpy(np.minimum(np.floor(np.arange(n_out) * sp + 1e-6).astype(np.int64), n_in - 1))


@_op("upsample_nearest_neighbor")
def _upsample_nn(v):
    ix = v.arg("x")
    xs, os_ = v.in_shape("x"), v.out_shape()
    sh, sw = float(v.val("scale_factor_height", 1)), float(v.val("scale_factor_width", 1))
    ih, iw = _nearest_index(xs[-2], os_[-2], sh), _nearest_index(xs[-1], os_[-1], sw)

    def run(a):
        x = a[ix]
        return x.index_select(x.dim() - 2, ih).index_select(x.dim() - 1, iw)
    return run


@_op("resize_nearest_neighbor")
def _resize_nn(v):
    ix = v.arg("x")
    xs, os_ = v.in_shape("x"), v.out_shape()
    ih, iw = _nearest_index(xs[-2], os_[-2], None), _nearest_index(xs[-1], os_[-1], None)

    def run(a):
        x = a[ix]
        return x.index_select(x.dim() - 2, ih).index_select(x.dim() - 1, iw)
    return run


@_op("resample")
def _resample(v):
    ix, ic = v.arg("x"), v.arg("coordinates")
    xs = v.in_shape("x")
    mode = str(v.val("sampling_mode", "bilinear"))
    pmode = str(v.val("padding_mode", "constant"))
    pval = float(v.val("padding_value", 0.0))
    cmode = str(v.val("coordinates_mode", "normalized_minus_one_to_one"))
    ac = bool(v.val("align_corners", False))
    if mode not in ("bilinear", "nearest"):
        raise v.unsupported(f"has unknown sampling_mode '{mode}'")
    H, W = xs[2], xs[3]
    sizes = torch.tensor([W, H], dtype=torch.float32)
    # torch's grid_sample couples reflection to align_corners; MIL's reflection (about the edge pixels'
    # centres) is torch's reflection with align_corners=True, MIL's symmetric (about the edges) is
    # torch's with align_corners=False: otherwise the coordinates are converted to that convention
    if pmode == "constant":
        tpad, tac = "zeros", ac
    elif pmode == "border":
        tpad, tac = "border", ac
    elif pmode == "reflection":
        tpad, tac = "reflection", True
    elif pmode == "symmetric":
        tpad, tac = "reflection", False
    else:
        raise v.unsupported(f"has unknown padding_mode '{pmode}'")

    def to_pixels(c):   # MIL coordinates → pixel coordinates (0 = centre of the first pixel)
        if cmode == "unnormalized":
            return c
        if cmode == "normalized_zero_to_one":
            c = c * 2 - 1
        elif cmode != "normalized_minus_one_to_one":
            raise v.unsupported(f"has unknown coordinates_mode '{cmode}'")
        return ((c + 1) / 2) * (sizes - 1) if ac else ((c + 1) * sizes - 1) / 2

    def to_grid(p):     # pixel coordinates → torch's normalised grid under align_corners=tac
        return p / (sizes - 1) * 2 - 1 if tac else (2 * p + 1) / sizes - 1

    direct = cmode == "normalized_minus_one_to_one" and tac == ac

    def run(a):
        x, c = a[ix], a[ic]
        c = c.to(torch.float32) if c.dtype != torch.float32 else c
        g = c if direct else to_grid(to_pixels(c))
        if x.dtype != g.dtype:
            g = g.to(x.dtype)
        if tpad == "zeros" and pval != 0.0:
            return F.grid_sample(x - pval, g, mode=mode, padding_mode="zeros", align_corners=tac) + pval
        return F.grid_sample(x, g, mode=mode, padding_mode=tpad, align_corners=tac)
    return run


# --- attention (iOS18) --------------------------------------------------------------------------------

@_op("scaled_dot_product_attention")
def _sdpa(v):
    iq, ik, iv = v.arg("query"), v.arg("key"), v.arg("value")
    im = v.arg("attn_mask") if v.has("attn_mask") else None

    def run(a):
        mask = None if im is None else a[im]
        return F.scaled_dot_product_attention(a[iq], a[ik], a[iv], attn_mask=mask)
    return run


# --- top-k and friends ----------------------------------------------------------------------------

@_op("topk")
def _topk(v):
    ix = v.arg("x")
    rank = len(v.in_shape("x"))
    k = int(v.val("k", 1))
    ax = _axis(v.val("axis", -1), rank)
    asc = bool(v.val("ascending", False))

    def run(a):
        vals, idx = torch.topk(a[ix], k, dim=ax, largest=not asc, sorted=True)
        return vals, idx.to(torch.int32)
    return run


@_op("argsort")
def _argsort(v):
    ix = v.arg("x")
    ax = _axis(v.val("axis", -1), len(v.in_shape("x")))
    asc = bool(v.val("ascending", False))
    return lambda a: torch.argsort(a[ix], dim=ax, descending=not asc, stable=True).to(torch.int32)


@_op("one_hot")
def _one_hot(v):
    ii = v.arg("indices")
    depth = int(v.val("one_hot_vector_size"))
    ax = int(v.val("axis", -1))
    on, off = float(v.val("on_value", 1.0)), float(v.val("off_value", 0.0))

    def run(a):
        oh = F.one_hot(a[ii].long(), depth).to(torch.float32)
        y = oh * (on - off) + off
        return y.movedim(-1, ax) if ax != -1 else y
    return run


# --- compressed constants (decompressed once, at load time) ------------------------------------------

def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Indices packed LSB first, one byte at a time (coremltools' layout) → uint8 values."""
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8).reshape(-1), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.uint16)
    return (bits << np.arange(nbits, dtype=np.uint16)).sum(axis=1).astype(np.uint8)


def _broadcast_axis(p: np.ndarray, rank: int, axis: int) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim == 0 or p.size == 1:
        return p.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return p.reshape(shape)


def _repeat_blocks(p: np.ndarray, shape) -> np.ndarray:
    p = np.asarray(p)
    for d, (n, m) in enumerate(zip(shape, p.shape)):
        if m != n:
            p = np.repeat(p, n // m, axis=d)
    return p


def _decompress(op, np_consts: dict) -> list[np.ndarray]:
    t = op.op_type
    iv = op.inputs

    def c(k):
        x = iv.get(k)
        if x is None:
            return None
        if x.name in np_consts:
            return np_consts[x.name]
        return x.val

    out_dt = [_dtype_name(o) for o in op.outputs]
    np_out = [np.float16 if d == "fp16" else (np.float32 if d == "fp32" else None) for d in out_dt]
    if t == "constexpr_affine_dequantize":
        q = np.asarray(c("quantized_data"))
        rank = q.ndim
        ax = _axis(c("axis"), rank)
        zp = _broadcast_axis(c("zero_point"), rank, ax).astype(np.float32)
        sc = _broadcast_axis(c("scale"), rank, ax).astype(np.float32)
        return [((q.astype(np.float32) - zp) * sc).astype(np_out[0])]
    if t == "constexpr_cast":
        return [np.asarray(c("source_val")).astype(np_out[0])]
    if t == "constexpr_lut_to_dense":
        lut, idx = np.asarray(c("lut")), np.asarray(c("indices"))
        if "shape" in iv and iv["shape"] is not None:      # iOS16: a flat LUT, indices packed in bytes
            shape = [int(s) for s in np.asarray(c("shape")).reshape(-1)]
            nbits = int(round(math.log2(lut.size)))
            ix = _unpack_bits(idx, nbits, int(np.prod(shape)))
            return [lut.reshape(-1)[ix.astype(np.int64)].reshape(shape).astype(np_out[0] or lut.dtype)]
        return [_lut_blockwise(idx, lut, c("vector_axis")).astype(np_out[0] or lut.dtype)]
    if t == "constexpr_blockwise_shift_scale":
        data = np.asarray(c("data"))
        scale = np.asarray(c("scale")).astype(np.float32)
        off = c("offset")
        d = data.astype(np.float32)
        if off is not None:
            d = d - _repeat_blocks(np.asarray(off).astype(np.float32), data.shape)
        return [(d * _repeat_blocks(scale, data.shape)).astype(np_out[0])]
    if t == "constexpr_sparse_to_dense":
        nz = np.asarray(c("nonzero_data"))
        mask = np.asarray(c("mask"))
        if "shape" in iv and iv["shape"] is not None:      # iOS16: a packed bit mask
            shape = [int(s) for s in np.asarray(c("shape")).reshape(-1)]
            m = _unpack_bits(mask, 1, int(np.prod(shape))).reshape(shape)
        else:
            m = mask
        dense = np.zeros(m.shape, dtype=nz.dtype)
        dense[m != 0] = nz.reshape(-1)
        return [dense]
    if t == "constexpr_lut_to_sparse":
        mask = np.asarray(c("indices_mask"))
        nzi = np.asarray(c("indices_nonzero_data"))
        lut = np.asarray(c("lut"))
        va = c("vector_axis")
        dense_idx = np.zeros(mask.shape, dtype=np.uint8)
        dense_idx[mask != 0] = nzi.reshape(-1)
        vals = _lut_blockwise(dense_idx, lut, va)
        m = mask
        if va is not None and lut.shape[-1] > 1:
            m = np.repeat(mask, lut.shape[-1], axis=int(va))
        return [m, vals[m != 0].reshape(-1)]
    if t == "constexpr_sparse_blockwise_shift_scale":
        mask = np.asarray(c("data_mask"))
        nz = np.asarray(c("nonzero_data"))
        scale = np.asarray(c("scale")).astype(np.float32)
        off = c("offset")
        d = np.zeros(mask.shape, np.float32)
        d[mask != 0] = nz.reshape(-1).astype(np.float32)
        if off is not None:
            d = d - _repeat_blocks(np.asarray(off).astype(np.float32), mask.shape)
        d = d * _repeat_blocks(scale, mask.shape)
        return [mask, d[mask != 0].reshape(-1).astype(np_out[1])]
    raise UnsupportedOp(t, op.name)


def _lut_blockwise(indices: np.ndarray, lut: np.ndarray, vector_axis) -> np.ndarray:
    """iOS18 LUT: ``lut`` has rank(indices) + 2 dims (blocks…, palette, vector)."""
    idx = np.asarray(indices).astype(np.int64)
    rank = idx.ndim
    vec = lut.shape[-1]
    # expand each block's table over its block so every index position sees its own table
    tables = lut
    for d in range(rank):
        if tables.shape[d] != idx.shape[d]:
            tables = np.repeat(tables, idx.shape[d] // tables.shape[d], axis=d)
    vals = np.take_along_axis(tables, idx[..., None, None], axis=rank)[..., 0, :]   # (*idx.shape, vec)
    if vec == 1:
        return vals[..., 0]
    va = _axis(vector_axis, rank)
    vals = np.moveaxis(vals, -1, va + 1)                                           # vector right after its axis
    shape = list(idx.shape)
    shape[va] *= vec
    return vals.reshape(shape)


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
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                ml = ct.models.MLModel(str(self.path), skip_model_load=True)
                spec = ml.get_spec()
        except Exception as e:  # noqa: BLE001 — a broken or foreign file
            raise EdgeExportError(f"cannot read Core ML package {self.path}: {first_line(e)}") from None
        if spec.WhichOneof("Type") != "mlProgram":
            raise EdgeExportError(f"{self.path} is a Core ML '{spec.WhichOneof('Type')}' model, not an ML Program; "
                                  "the reference runner executes ML Programs (convert_to='mlprogram') only")
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
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
