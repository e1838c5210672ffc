"""decompose_norms: LayerNorm and GroupNorm written as means, a subtraction, a sqrt and a division.

XNNPACK has neither norm, NNAPI has neither (ONNX InstanceNormalization / LayerNormalization), and
Core ML spells GroupNorm as six primitive ops anyway. Left as they are, every norm of a
transformer runs on ExecuTorch's portable kernels (8 ms against 0.25 ms for a 3136×64 LayerNorm
measured here) and cuts the graph into another delegate. Rewritten, with each mean a product with
a 1/L vector (:func:`mean_as_gemm.row_mean`) on a (rows, L) view:

    mu = mean(x); d = x - mu; y = d * (1 / sqrt(mean(d * d) + eps)) [* weight + bias]

the two-pass variance PyTorch computes, every op one XNNPACK takes.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from .base import Pass, PassContext, add_constant, aten, constant_value, replace_node, shape
from .mean_as_gemm import row_mean

_NORMS = {aten.layer_norm.default, aten.group_norm.default}


def _arg(n: fx.Node, i: int, name: str, default):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


class DecomposeNorms(Pass):
    name = "decompose_norms"
    summary = "LayerNorm/GroupNorm as mean/sub/mul/sqrt/div on a (rows, L) view (ops every mobile delegate takes)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        g = gm.graph
        for n in list(g.nodes):
            if n.op != "call_function" or n.target not in _NORMS:
                continue
            x = n.args[0]
            xs = shape(x)
            if xs is None:
                continue
            if n.target is aten.layer_norm.default:
                k = len(n.args[1])
                rows, length = math.prod(xs[:-k]), math.prod(xs[-k:])
                w, b, eps = _arg(n, 2, "weight", None), _arg(n, 3, "bias", None), _arg(n, 4, "eps", 1e-5)
                affine_shape = list(xs[-k:])
            else:
                groups = n.args[1]
                rows, length = xs[0] * groups, math.prod(xs) // (xs[0] * groups)
                w, b, eps = _arg(n, 2, "weight", None), _arg(n, 3, "bias", None), _arg(n, 4, "eps", 1e-5)
                affine_shape = [xs[1]] + [1] * (len(xs) - 2)
            consts = [constant_value(gm, v) if isinstance(v, fx.Node) else None for v in (w, b)]
            if any(isinstance(v, fx.Node) and c is None for v, c in zip((w, b), consts)):
                continue                          # an affine that depends on the input: leave it
            dtype = n.meta["val"].dtype
            with g.inserting_before(n):
                x2 = g.call_function(aten.reshape.default, (x, [rows, length]))
            mu = row_mean(gm, n, x2, length, dtype)
            with g.inserting_before(n):
                d = g.call_function(aten.sub.Tensor, (x2, mu))
                sq = g.call_function(aten.mul.Tensor, (d, d))
            var = row_mean(gm, n, sq, length, dtype)
            one = add_constant(gm, n, torch.ones(1, dtype=dtype), "one")
            with g.inserting_before(n):   # 1 / sqrt, not rsqrt: NNAPI has Div and Sqrt but no Reciprocal
                std = g.call_function(aten.sqrt.default, (g.call_function(aten.add.Tensor, (var, float(eps))),))
                inv = g.call_function(aten.div.Tensor, (one, std))
                y = g.call_function(aten.mul.Tensor, (d, inv))
                y = g.call_function(aten.reshape.default, (y, list(xs)))
            for c, op, hint in ((consts[0], aten.mul.Tensor, "norm_w"), (consts[1], aten.add.Tensor, "norm_b")):
                if c is None:
                    continue
                cn = add_constant(gm, n, c.reshape(affine_shape), hint)
                with g.inserting_before(n):
                    y = g.call_function(op, (y, cn))
            replace_node(n, y)
            changed += 1
        return changed
