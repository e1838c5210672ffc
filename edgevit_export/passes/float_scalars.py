"""float_scalars: float arithmetic never takes an integer scalar.

``(head(x) + head_dist(x)) / 2`` captures as ``div(x, 2)`` with an integer 2; lowering to
ExecuTorch makes that a 0-d int64 constant and a ``_to_dim_order_copy`` cast to float, an op
XNNPACK does not take (the dtype changes), so it runs on a portable kernel and splits the graph.
``hardsigmoid`` decomposes the same way (``(x + 3) / 6`` with integer constants). Written with
float scalars — ``div(x, 2.0)``; ``hardtanh(x + 3.0, 0.0, 6.0) / 6.0``, PyTorch's own formula for
hardsigmoid — the values are the same and every op is one XNNPACK takes.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import Pass, PassContext, aten, replace_node

_ARITH = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.rsub.Scalar,
          aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar}


def _is_float(n) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


class FloatScalars(Pass):
    name = "float_scalars"
    summary = "integer scalars in float arithmetic (x / 2, hardsigmoid's +3 and /6) written as floats"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        g = gm.graph
        for n in list(g.nodes):
            if n.op != "call_function":
                continue
            if n.target in _ARITH and _is_float(n):
                args = tuple(float(a) if isinstance(a, int) and not isinstance(a, bool) else a for a in n.args)
                if args != n.args or any(type(a) is not type(b) for a, b in zip(args, n.args)):
                    n.args = args
                    changed += 1
            elif n.target is aten.hardsigmoid.default and _is_float(n):
                with g.inserting_before(n):
                    t = g.call_function(aten.add.Tensor, (n.args[0], 3.0))
                    t = g.call_function(aten.hardtanh.default, (t, 0.0, 6.0))
                    t = g.call_function(aten.div.Tensor, (t, 6.0))
                replace_node(n, t)
                changed += 1
        return changed
