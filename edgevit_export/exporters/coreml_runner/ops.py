"""Kernels, part 1: the op view an implementation sees at load time, the registry (``@_op``), and
the elementwise, activation, linear-algebra, convolution/pooling, normalisation and reduction ops."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .base import UnsupportedOp


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
