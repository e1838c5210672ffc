"""linear_to_conv: token-wise Linear layers on a channels-first map run as 1×1 convolutions.

A model that flattens a (B, C, H, W) map to tokens (B, HW, C), applies Linear layers (and
element-wise activations) and folds the result back to (B, C', H, W) pays for a transpose pair
around every such region. Apple's Neural Engine guidance asks for channels-first 4-D tensors and
few transposes; a Linear over channels is exactly a 1×1 convolution, so the whole region runs
channels-first and both transposes disappear. Regions that do anything else to the tokens
(LayerNorm, attention, reshapes) are left alone.
"""

from __future__ import annotations

import torch.fx as fx

from .base import Pass, PassContext, add_constant, aten, constant_value, shape
from .cancel_reshapes import _perm, _permute_like, _reshape_like
from .rank_le5 import _UNARY

_BINARY = {aten.add.Tensor, aten.mul.Tensor}


def _to_tokens(n: fx.Node):
    """If ``n`` is a (B,C,H,W) map moved to channels-last tokens, return that map."""
    if _permute_like(n):
        src, p, ns = n.args[0], _perm(n), shape(n)
        if p == [0, 2, 3, 1] and len(shape(src) or ()) == 4:
            return src
        if p == [0, 2, 1] and _reshape_like(src) and ns is not None:
            x4 = src.args[0]
            xs = shape(x4)
            if xs is not None and len(xs) == 4 and shape(src) == (xs[0], xs[1], xs[2] * xs[3]):
                return x4
    return None


def _from_tokens(n: fx.Node, hw: tuple[int, int]):
    """If ``n``'s single use moves it back to a channels-first (B,C,H,W) map, return that node."""
    users = list(n.users)
    if len(users) != 1 or not _permute_like(users[0]):
        return None
    t = users[0]
    p = _perm(t)
    if p == [0, 3, 1, 2] and shape(t) is not None and shape(t)[2:] == hw:
        return t
    if p == [0, 2, 1] and len(t.users) == 1:
        r = next(iter(t.users))
        rs = shape(r)
        if _reshape_like(r) and rs is not None and len(rs) == 4 and rs[2:] == hw:
            return r
    return None


class LinearToConv(Pass):
    name = "linear_to_conv"
    summary = "token-wise Linear on a channels-first map run as 1×1 conv (removes a transpose pair)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        for entry in list(gm.graph.nodes):
            if entry.graph is not gm.graph or entry.op != "call_function":
                continue
            x4 = _to_tokens(entry)
            if x4 is None:
                continue
            region = self._region(entry, tuple(shape(x4)[2:]))
            if region is None:
                continue
            nodes, exits = region
            cf = {entry: x4}
            for n in nodes:  # in graph order
                with gm.graph.inserting_before(n):
                    if n.target is aten.linear.default:
                        w = constant_value(gm, n.args[1])
                        b = n.args[2] if len(n.args) > 2 else None
                        wn = add_constant(gm, n, w[:, :, None, None], "conv_w")
                        cf[n] = gm.graph.call_function(aten.conv2d.default, (cf[n.args[0]], wn, b))
                    else:
                        args = tuple(cf.get(a, a) for a in n.args)
                        cf[n] = gm.graph.call_function(n.target, args, dict(n.kwargs))
            for z, back in exits:
                back.replace_all_uses_with(cf[z])
            changed += len([n for n in nodes if n.target is aten.linear.default])
            gm.graph.eliminate_dead_code()
        return changed

    @staticmethod
    def _region(entry: fx.Node, hw):
        """Nodes reachable from ``entry`` through token-wise ops, if every way out returns to a
        channels-first map of the same size; else None."""
        region, exits, todo = [], [], [entry]
        seen = {entry}
        while todo:
            n = todo.pop()
            back = _from_tokens(n, hw)
            if back is not None:
                exits.append((n, back))
                continue
            if not n.users:
                return None
            for u in n.users:
                if u in seen:
                    continue
                ok = (u.target is aten.linear.default and u.args[0] in seen | {n}
                      and constant_value(u.graph.owning_module, u.args[1]) is not None) \
                    or u.target in _UNARY \
                    or (u.target in _BINARY and all(isinstance(a, fx.Node) and a in seen | {n} for a in u.args[:2]))
                if not ok:
                    return None
                seen.add(u)
                region.append(u)
                todo.append(u)
        if not exits or not any(n.target is aten.linear.default for n in region):
            return None
        order = {n: i for i, n in enumerate(entry.graph.nodes)}
        return sorted(region, key=order.get), exits
