"""cancel_reshapes: layout ops that undo each other or repeat themselves removed.

Every reshape/transpose on a phone is a full read and write of the tensor (the SHViT paper's
point: memory-bound ops dominate attention's runtime on device). This pass removes inverse
permute pairs, merges consecutive permutes and consecutive reshapes, drops reshapes and permutes
that change nothing, hoists one identical reshape of every piece of a split above the split, and
turns global pooling followed by a flatten into one mean.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .base import PERMUTE_OPS, RESHAPE_OPS, Pass, PassContext, annotate, aten, shape


def _perm(n: fx.Node) -> list[int] | None:
    s = shape(n.args[0])
    if s is None:
        return None
    r = len(s)
    if n.target is aten.permute.default:
        return [p % r for p in n.args[1]]
    perm = list(range(r))
    d0, d1 = (0, 1) if n.target is aten.t.default else (n.args[1] % r, n.args[2] % r)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _reshape_like(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in RESHAPE_OPS


def _permute_like(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in PERMUTE_OPS


class CancelReshapes(Pass):
    name = "cancel_reshapes"
    summary = "inverse permutes removed, consecutive reshapes/permutes merged, no-op reshapes dropped"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        total = 0
        while True:
            changed = 0
            for n in list(gm.graph.nodes):
                if n.op != "call_function" or n.graph is not gm.graph:
                    continue
                changed += (self._noop(gm, n) or self._merge_reshapes(gm, n) or self._merge_permutes(gm, n)
                            or self._pool_flatten(gm, n) or self._hoist_split_reshape(gm, n))
            gm.graph.eliminate_dead_code()
            gm.recompile()
            annotate(gm, ctx.example_inputs)
            total += changed
            if not changed:
                return total

    @staticmethod
    def _noop(gm, n) -> int:
        if (_reshape_like(n) or n.target in (aten.contiguous.default, aten.clone.default)) \
                and shape(n) is not None and shape(n) == shape(n.args[0]):
            n.replace_all_uses_with(n.args[0])
            return 1
        if _permute_like(n):
            p = _perm(n)
            if p is not None and p == sorted(p):
                n.replace_all_uses_with(n.args[0])
                return 1
        return 0

    @staticmethod
    def _merge_reshapes(gm, n) -> int:
        src = n.args[0] if n.args else None
        if _reshape_like(n) and _reshape_like(src) and len(src.users) == 1 and shape(n) is not None:
            with gm.graph.inserting_before(n):
                new = gm.graph.call_function(aten.reshape.default, (src.args[0], list(shape(n))))
            new.meta["val"] = n.meta["val"]
            n.replace_all_uses_with(new)
            return 1
        return 0

    @staticmethod
    def _merge_permutes(gm, n) -> int:
        src = n.args[0] if n.args else None
        if _permute_like(n) and _permute_like(src) and len(src.users) == 1:
            p_outer, p_inner = _perm(n), _perm(src)
            if p_outer is None or p_inner is None:
                return 0
            composed = [p_inner[i] for i in p_outer]
            if composed == sorted(composed):
                n.replace_all_uses_with(src.args[0])
            else:
                with gm.graph.inserting_before(n):
                    new = gm.graph.call_function(aten.permute.default, (src.args[0], composed))
                new.meta["val"] = n.meta["val"]
                n.replace_all_uses_with(new)
            return 1
        return 0

    @staticmethod
    def _hoist_split_reshape(gm, n) -> int:
        """split(x, sizes, d) whose every piece gets the same reshape of the axes after d
        → one reshape of x before the split."""
        if n.target not in (aten.split_with_sizes.default, aten.split.Tensor):
            return 0
        x = n.args[0]
        xs = shape(x)
        if xs is None:
            return 0
        d = (n.args[2] if len(n.args) > 2 else 0) % len(xs)
        pieces = list(n.users)
        if not pieces or any(p.target is not operator.getitem or len(p.users) != 1 for p in pieces):
            return 0
        reshapes = [next(iter(p.users)) for p in pieces]
        if not all(_reshape_like(r) and r.args[0] is p for r, p in zip(reshapes, pieces)):
            return 0
        tails = set()
        for r, p in zip(reshapes, pieces):
            ps, rs = shape(p), shape(r)
            if ps is None or rs is None or len(rs) < d + 1 or rs[: d + 1] != ps[: d + 1]:
                return 0
            tails.add(tuple(rs[d + 1:]))
        if len(tails) != 1:
            return 0
        tail = tails.pop()
        with gm.graph.inserting_before(n):
            flat = gm.graph.call_function(aten.reshape.default, (x, list(xs[: d + 1]) + list(tail)))
        flat.meta["val"] = x.meta["val"].new_empty(tuple(xs[: d + 1]) + tail)
        n.args = (flat,) + tuple(n.args[1:])
        for r, p in zip(reshapes, pieces):
            p.meta["val"] = r.meta["val"]
            r.replace_all_uses_with(p)
        return len(reshapes) - 1

    @staticmethod
    def _pool_flatten(gm, n) -> int:
        if n.target is not aten.adaptive_avg_pool2d.default or list(n.args[1]) != [1, 1]:
            return 0
        users = list(n.users)
        if len(users) != 1 or not _reshape_like(users[0]):
            return 0
        r = users[0]
        xs, rs = shape(n.args[0]), shape(r)
        if xs is None or rs != tuple(xs[:2]):
            return 0
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(aten.mean.dim, (n.args[0], [-2, -1]))
        new.meta["val"] = r.meta["val"]
        r.replace_all_uses_with(new)
        return 1
