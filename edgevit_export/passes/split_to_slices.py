"""split_to_slices: split / chunk / unbind / select written as slices along the same dim.

Attention blocks cut their fused qkv projection with ``split``/``chunk``/``unbind`` or index it
(``qkv[0]``), and partial-channel blocks (SHViT) split channels. ExecuTorch's XNNPACK partitioner
takes ``slice_copy`` (stride 1) but no ``split_with_sizes_copy``, ``unbind`` or ``select_copy``:
each stays on a portable kernel and cuts the graph into another delegate. A slice computes the
same values (a copy of the same elements); ``select``/``unbind`` drop the dim with a reshape.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .base import Pass, PassContext, aten, replace_node, shape

_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
           aten.split_with_sizes_copy.default, aten.unbind_copy.int}


def _bounds(n: fx.Node, size: int) -> list[tuple[int, int]] | None:
    """(start, end) of every piece of a split-like node along its dim."""
    if n.target in (aten.unbind.int, aten.unbind_copy.int):
        return [(i, i + 1) for i in range(size)]
    arg = n.args[1]
    if n.target is aten.chunk.default:
        step = -(-size // int(arg))
        sizes = [min(step, size - s) for s in range(0, size, step)]
    elif isinstance(arg, int):
        sizes = [min(arg, size - s) for s in range(0, size, arg)]
    else:
        sizes = [int(s) for s in arg]
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def _dim(n: fx.Node, rank: int) -> int:
    if n.target in (aten.unbind.int, aten.unbind_copy.int):
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    else:
        d = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    return d % rank


class SplitToSlices(Pass):
    name = "split_to_slices"
    summary = "split/chunk/unbind/select as slices along the same dim (XNNPACK takes slices, not splits)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        g = gm.graph
        for n in list(g.nodes):
            if n.op != "call_function":
                continue
            if n.target in _SPLITS:
                xs = shape(n.args[0])
                if xs is None:
                    continue
                dim = _dim(n, len(xs))
                pieces = _bounds(n, xs[dim])
                drop = n.target in (aten.unbind.int, aten.unbind_copy.int)
                users = list(n.users)
                if not all(u.target is operator.getitem for u in users):
                    continue
                for u in users:
                    start, end = pieces[u.args[1]]
                    with g.inserting_before(u):
                        s = g.call_function(aten.slice.Tensor, (n.args[0], dim, start, end))
                        if drop:
                            s = g.call_function(aten.reshape.default, (s, list(shape(u))))
                    replace_node(u, s)
                g.erase_node(n)
                changed += 1
            elif n.target is aten.select.int:
                xs = shape(n.args[0])
                if xs is None:
                    continue
                dim = n.args[1] % len(xs)
                i = n.args[2] % xs[dim]
                with g.inserting_before(n):
                    s = g.call_function(aten.slice.Tensor, (n.args[0], dim, i, i + 1))
                    r = g.call_function(aten.reshape.default, (s, list(shape(n))))
                replace_node(n, r)
                changed += 1
        return changed
