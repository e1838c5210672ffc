"""rank_le5: every tensor of rank > 5 rewritten away with equivalent ops of rank ≤ 5.

Core ML rejects tensors of rank > 5 outright; Swin-style window partitions (LITv2's Hi-Fi
attention) go through rank-6 tensors such as (B, H/ws, ws, W/ws, ws, C). The rewrite is driven by
shapes and permutations only, not by any one model's code:

1. Compute ops that touch a rank > 5 tensor but act on its trailing axes only (linear, layer_norm
   over the last axis, softmax over the last axis, element-wise ops) get the leading axes
   flattened around them; ``select``/``slice`` on an axis and batched matmul get the axes before
   and after theirs merged. Afterwards rank > 5 tensors are produced and consumed by layout ops
   (reshape/view/permute/transpose) only.
2. Each chain of layout ops that leaves rank ≤ 5, passes through rank > 5 and comes back is
   composed into reshape→permute→reshape steps; unit axes are dropped and axes that stay adjacent
   and in order through the permutation are merged. If a permutation still needs more than five
   axes it is decomposed into swaps of adjacent axis blocks, each a rank-4 transpose.
"""

from __future__ import annotations

import math
import operator

import torch.fx as fx

from .base import LAYOUT_OPS, PERMUTE_OPS, Pass, PassContext, PassRefused, annotate, aten, shape

_UNARY = {aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.silu.default,
          aten.hardswish.default, aten.hardsigmoid.default, aten.tanh.default, aten.dropout.default,
          aten.neg.default, aten.exp.default, aten.sqrt.default, aten.rsqrt.default}
_BINARY = {aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_SELECT = {aten.select.int, aten.slice.Tensor}
_MATMUL = {aten.matmul.default, aten.bmm.default}

MAX_RANK = 5


def _rank(n) -> int:
    s = shape(n)
    return len(s) if s is not None else 0


def source_of(n: fx.Node) -> str:
    """Where a node comes from in the user's model (module path), for messages."""
    stack = n.meta.get("nn_module_stack")
    if stack:
        path, _typ = list(stack.values())[-1]
        return str(path) or n.name
    return n.name


def high_rank_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "placeholder", "get_attr") and _rank(n) > MAX_RANK]


def _call(gm, before, target, *args):
    with gm.graph.inserting_before(before):
        return gm.graph.call_function(target, args)


def _reshape(gm, before, x, shp):
    return _call(gm, before, aten.reshape.default, x, [int(s) for s in shp])


class RankLe5(Pass):
    name = "rank_le5"
    summary = "chains of reshape/permute through rank > 5 (window partitions) rewritten with rank ≤ 5"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        before = len(high_rank_nodes(gm))
        if not before:
            return 0
        for n in list(gm.graph.nodes):
            if n.op == "call_function" and n.target not in LAYOUT_OPS and n.target is not operator.getitem \
                    and self._touches_high_rank(n):
                self._isolate(gm, n)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        annotate(gm, ctx.example_inputs)
        for n in list(gm.graph.nodes):
            if n.op == "call_function" and n.target in LAYOUT_OPS and _rank(n) <= MAX_RANK and n.args \
                    and isinstance(n.args[0], fx.Node) and _rank(n.args[0]) > MAX_RANK:
                self._compose_chain(gm, n)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        annotate(gm, ctx.example_inputs)
        left = high_rank_nodes(gm)
        if left:
            n = left[0]
            raise PassRefused(f"cannot lower rank-{_rank(n)} tensor {shape(n)} at {source_of(n)} "
                              f"(op {n.target}): no rank ≤ 5 form known for it")
        return before

    @staticmethod
    def _touches_high_rank(n: fx.Node) -> bool:
        if _rank(n) > MAX_RANK:
            return True
        return any(isinstance(a, fx.Node) and _rank(a) > MAX_RANK for a in n.args)

    def _isolate(self, gm, n: fx.Node) -> None:
        """Rewrite one compute op so that it neither takes nor makes a rank > 5 tensor."""
        out_shape = shape(n)
        x = n.args[0]
        xs = shape(x)
        if n.target is aten.linear.default or n.target in _UNARY or (
                n.target is aten.layer_norm.default and len(n.args[1]) == 1) or (
                n.target in _SOFTMAX and n.args[1] in (-1, len(xs) - 1)):
            flat = _reshape(gm, n, x, (math.prod(xs[:-1]), xs[-1]))
            args = list(n.args)
            args[0] = flat
            if n.target in _SOFTMAX:
                args[1] = -1
            self._replace(gm, n, args, out_shape)
        elif n.target in _BINARY:
            a, b = n.args[0], n.args[1]
            sa, sb = shape(a), shape(b)
            if sa is not None and sb is not None and sa == sb:
                args = [_reshape(gm, n, a, (math.prod(sa[:-1]), sa[-1])),
                        _reshape(gm, n, b, (math.prod(sb[:-1]), sb[-1]))] + list(n.args[2:])
            elif sa is not None and (sb is None or len(sb) <= 1):
                args = [_reshape(gm, n, a, (math.prod(sa[:-1]), sa[-1]))] + list(n.args[1:])
            else:
                raise PassRefused(f"element-wise {n.target} at {source_of(n)} broadcasts a rank-"
                                  f"{len(sa or ())} tensor against {sb}: no rank ≤ 5 form known")
            self._replace(gm, n, args, out_shape)
        elif n.target in _SELECT or (n.target in _SOFTMAX):
            dim = n.args[1] % len(xs)
            merged = (math.prod(xs[:dim]), xs[dim], math.prod(xs[dim + 1:]))
            args = [_reshape(gm, n, x, merged), 1] + list(n.args[2:])
            self._replace(gm, n, args, out_shape)
        elif n.target is aten.unbind.int:
            dim = (n.args[1] if len(n.args) > 1 else 0) % len(xs)
            merged = _reshape(gm, n, x, (math.prod(xs[:dim]), xs[dim], math.prod(xs[dim + 1:])))
            with gm.graph.inserting_before(n):
                new = gm.graph.call_function(aten.unbind.int, (merged, 1))
            for g in list(n.users):
                with gm.graph.inserting_before(g):
                    piece = gm.graph.call_function(operator.getitem, (new, g.args[1]))
                    back = gm.graph.call_function(aten.reshape.default, (piece, list(shape(g))))
                g.replace_all_uses_with(back)
                gm.graph.erase_node(g)
            gm.graph.erase_node(n)
        elif n.target in _MATMUL:
            a, b = n.args[0], n.args[1]
            sa, sb = shape(a), shape(b)
            if sa is None or sb is None or len(sa) != len(sb) or sa[:-2] != sb[:-2]:
                raise PassRefused(f"batched matmul at {source_of(n)} with shapes {sa} and {sb}: "
                                  "broadcast batch axes are not lowered")
            bsz = math.prod(sa[:-2])
            args = [_reshape(gm, n, a, (bsz,) + sa[-2:]), _reshape(gm, n, b, (bsz,) + sb[-2:])]
            self._replace(gm, n, args, out_shape)
        else:
            raise PassRefused(f"op {n.target} at {source_of(n)} takes or makes a rank-"
                              f"{max(_rank(n), len(xs or ()))} tensor and has no rank ≤ 5 rewrite")

    @staticmethod
    def _replace(gm, n, args, out_shape):
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(n.target, tuple(args), dict(n.kwargs))
            back = gm.graph.call_function(aten.reshape.default, (new, list(out_shape)))
        n.replace_all_uses_with(back)
        gm.graph.erase_node(n)

    def _compose_chain(self, gm, end: fx.Node) -> None:
        chain = [end]
        src = end.args[0]
        while _rank(src) > MAX_RANK:
            if not (src.op == "call_function" and src.target in LAYOUT_OPS):
                raise PassRefused(f"rank-{_rank(src)} tensor {shape(src)} at {source_of(src)} "
                                  f"comes from {src.target}, which has no rank ≤ 5 rewrite")
            chain.append(src)
            src = src.args[0]
        chain.reverse()
        steps: list[tuple[str, tuple]] = []
        cur = shape(src)
        for node in chain:
            if node.target in PERMUTE_OPS:
                r = len(cur)
                if node.target is aten.permute.default:
                    perm = [p % r for p in node.args[1]]
                else:
                    perm = list(range(r))
                    if node.target is aten.t.default:
                        d0, d1 = 0, 1
                    else:
                        d0, d1 = node.args[1] % r, node.args[2] % r
                    perm[d0], perm[d1] = perm[d1], perm[d0]
                steps.append(("permute", (cur, tuple(perm))))
            cur = shape(node)
        x = src
        real = shape(src)
        for _kind, (in_shape, perm) in steps:
            for a2, p2 in lower_permute(in_shape, perm):
                if tuple(real) != tuple(a2):
                    x = _reshape(gm, end, x, a2)
                if list(p2) != list(range(len(p2))):
                    x = _call(gm, end, aten.permute.default, x, list(p2))
                real = tuple(a2[p] for p in p2)
        if tuple(real) != shape(end):
            x = _reshape(gm, end, x, shape(end))
        end.replace_all_uses_with(x)


def lower_permute(shape_in, perm) -> list[tuple[tuple, tuple]]:
    """Express ``permute(x.reshape(shape_in), perm)`` as (reshape, permute) steps of rank ≤ 5.

    Returns a list of (shape, permutation) pairs; applying each in turn (reshape the running
    tensor to ``shape``, then permute) yields, in row-major order, the same elements as the
    original permute.
    """
    keep = [i for i, s in enumerate(shape_in) if s != 1]
    if not keep:
        return [((1,), (0,))]
    a1 = [shape_in[i] for i in keep]
    p1 = [keep.index(p) for p in perm if shape_in[p] != 1]
    # merge input axes i, i+1 that stay adjacent and in order after the permutation
    pos = {ax: k for k, ax in enumerate(p1)}
    groups = [[0]]
    for i in range(1, len(a1)):
        if pos[i] == pos[i - 1] + 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    gid = {ax: g for g, members in enumerate(groups) for ax in members}
    a2 = tuple(math.prod(a1[i] for i in g) for g in groups)
    p2 = []
    for ax in p1:
        if not p2 or p2[-1] != gid[ax]:
            p2.append(gid[ax])
    p2 = tuple(p2)
    if len(a2) <= MAX_RANK:
        return [(a2, p2)]
    # still too many axes: bubble the blocks into place, each swap a rank-4 transpose
    steps = []
    order = list(range(len(a2)))  # which original block sits at each position
    sizes = list(a2)
    target = list(p2)
    changed = True
    while changed:
        changed = False
        for j in range(len(order) - 1):
            if target.index(order[j]) > target.index(order[j + 1]):
                pre, post = math.prod(sizes[:j]), math.prod(sizes[j + 2:])
                steps.append(((pre, sizes[j], sizes[j + 1], post), (0, 2, 1, 3)))
                order[j], order[j + 1] = order[j + 1], order[j]
                sizes[j], sizes[j + 1] = sizes[j + 1], sizes[j]
                changed = True
    return steps or [(a2, tuple(range(len(a2))))]
