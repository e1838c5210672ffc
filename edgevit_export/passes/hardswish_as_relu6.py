"""hardswish_as_relu6: hard-swish and hard-sigmoid as adds, a relu6 and muls (int8 LiteRT).

``x · relu6(x + 3) / 6`` is what hard-swish computes; LiteRT's XNNPACK delegate takes its
HARD_SWISH only in float, so in an int8 model every hard-swish falls out of the delegate and cuts
it (MobileNetV3-L: 14 pieces, int8 slower than fp32). Written as ``x · (relu6(x + 3) · (1/6))``
(and hard-sigmoid as ``relu6(x + 3) · (1/6)``) it becomes int8 ADD and MUL, with the clamp
absorbed into the quantization ranges. Multiplying by 1/6 for dividing by 6: within one rounding.
"""

from __future__ import annotations

import torch.fx as fx

from .base import Pass, PassContext, aten, replace_node

_HARDSWISH = (aten.hardswish.default, aten.hardswish_.default)
_HARDSIGMOID = (aten.hardsigmoid.default, aten.hardsigmoid_.default)


class HardswishAsRelu6(Pass):
    name = "hardswish_as_relu6"
    summary = "hard-swish / hard-sigmoid as x·(relu6(x + 3)·1/6) (int8 LiteRT: no float-only HARD_SWISH)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        g = gm.graph
        changed = 0
        for n in list(g.nodes):
            if n.op != "call_function" or n.target not in _HARDSWISH + _HARDSIGMOID:
                continue
            x = n.args[0]
            with g.inserting_before(n):
                gate = g.call_function(aten.hardtanh.default, (g.call_function(aten.add.Tensor, (x, 3.0)), 0.0, 6.0))
                out = g.call_function(aten.mul.Tensor, (gate, 1.0 / 6.0))
                if n.target in _HARDSWISH:
                    out = g.call_function(aten.mul.Tensor, (x, out))
            replace_node(n, out)
            changed += 1
        return changed
