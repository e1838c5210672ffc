"""mean_as_gemm: a mean that is not a 4-D global average pool becomes a product with a 1/L vector.

ExecuTorch's XNNPACK delegate takes ``mean`` only as a global average pool: a 4-D input, dims
(2, 3), keepdim. A classifier head's ``x.mean((2, 3))`` (no keepdim) gets keepdim and a reshape;
every other mean — over tokens, over the last dim — is the same sum written as a matrix product
with a constant vector of 1/L, which XNNPACK runs as a fully connected layer (measured on a
3136×64 LayerNorm: a product 0.25 ms, a pooled mean 0.56–1.26 ms, the portable LayerNorm 8 ms).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from .base import Pass, PassContext, add_constant, aten, replace_node, shape


def row_mean(gm: fx.GraphModule, before: fx.Node, x2: fx.Node, length: int, dtype=torch.float32) -> fx.Node:
    """``x2`` (rows, length) → (rows, 1): each row's mean, as ``x2 @ full((length, 1), 1/length)``."""
    ones = add_constant(gm, before, torch.full((length, 1), 1.0 / length, dtype=dtype), "mean_w")
    with gm.graph.inserting_before(before):
        return gm.graph.call_function(aten.mm.default, (x2, ones))


def _dims(n: fx.Node, rank: int) -> list[int] | None:
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if dims is None:
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % rank for d in dims) if dims else list(range(rank))


class MeanAsGemm(Pass):
    name = "mean_as_gemm"
    summary = "means as 4-D global average pools (keepdim) or products with a 1/L vector (XNNPACK takes both)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        g = gm.graph
        for n in list(g.nodes):
            if n.op != "call_function" or n.target is not aten.mean.dim or n.kwargs.get("dtype") is not None:
                continue
            xs, out = shape(n.args[0]), shape(n)
            if xs is None or out is None:
                continue
            dims = _dims(n, len(xs))
            keepdim = bool(n.args[2]) if len(n.args) > 2 else bool(n.kwargs.get("keepdim", False))
            if len(xs) == 4 and dims == [2, 3]:
                if keepdim:
                    continue                      # already a global average pool
                with g.inserting_before(n):
                    pooled = g.call_function(aten.mean.dim, (n.args[0], [2, 3], True))
                    new = g.call_function(aten.reshape.default, (pooled, list(out)))
            elif dims == list(range(dims[0], dims[-1] + 1)):   # one contiguous block of dims
                before, length, after = math.prod(xs[:dims[0]]), math.prod(xs[dims[0]:dims[-1] + 1]), \
                    math.prod(xs[dims[-1] + 1:])
                dtype = n.meta["val"].dtype
                if after == 1:
                    with g.inserting_before(n):
                        x2 = g.call_function(aten.reshape.default, (n.args[0], [before, length]))
                    m = row_mean(gm, n, x2, length, dtype)
                elif before == 1:   # rows become columns first: XNNPACK's product wants the constant second
                    with g.inserting_before(n):
                        x2 = g.call_function(aten.reshape.default, (n.args[0], [length, after]))
                        x2 = g.call_function(aten.permute.default, (x2, [1, 0]))
                    m = row_mean(gm, n, x2, length, dtype)
                else:
                    continue
                with g.inserting_before(n):
                    new = g.call_function(aten.reshape.default, (m, list(out)))
            else:
                continue
            replace_node(n, new)
            changed += 1
        return changed
