"""static_shapes: shape arithmetic folded to constants at the export resolution.

Reshapes computed from ``x.shape`` capture as ``sym_size`` nodes and integer mul/floordiv/add on
them. Exported as is they become Shape→Gather→Mul→Concat→Reshape chains: dynamic shapes that
Core ML rejects or runs slowly and that block other rewrites. At a fixed export resolution every
such value is a known integer, so it is written into the graph as a literal.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from .base import Pass, PassContext, aten

_SIZE_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default}
_ARITH = {operator.mul, operator.floordiv, operator.add, operator.sub, operator.truediv, operator.mod,
          operator.neg, torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, operator.pow}


class _Eval(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, (int, float, bool, torch.SymInt, torch.SymFloat)):
            self.values[n] = out
        return out


class StaticShapes(Pass):
    name = "static_shapes"
    summary = "shape arithmetic (sym_size, mul/floordiv on sizes) folded to constants at the export size"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        targets = [n for n in gm.graph.nodes
                   if n.op == "call_function" and (n.target in _SIZE_OPS or n.target in _ARITH)]
        if not targets:
            return 0
        ev = _Eval(gm)
        with torch.no_grad():
            ev.run(*ctx.example_inputs)
        changed = 0
        for n in targets:
            if n not in ev.values:
                continue
            value = ev.values[n]
            for user in list(n.users):
                user.args = tree_map(lambda a: value if a is n else a, user.args)
                user.kwargs = tree_map(lambda a: value if a is n else a, user.kwargs)
            changed += 1
        return changed
