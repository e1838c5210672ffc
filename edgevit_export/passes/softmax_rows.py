"""softmax_rows: a 4-D softmax over its last dim computed on a 3-D view of the same rows.

A correctness fix for ExecuTorch 1.5's XNNPACK lowering. Its ``ChannelsLastTaggedReshapePass``
keeps a convolution's output channels-last (NHWC) through every op it does not list as
layout-sensitive, and ``_softmax`` is in neither list; the softmax visitor then emits XNNPACK's
softmax, which normalises the innermost *physical* dim — the channels, not W. A softmax fed by a
convolution (EfficientFormerV2's talking-head attention: a 1×1 conv across heads, then
``softmax(dim=-1)``) comes out wrong: measured here on EfficientFormerV2-S1's attention at 512,
relative error 0.79 against PyTorch (1.7e-6 with this pass); in the whole random-weight model the
branch is scaled by LayerScale's 1e-5, so it showed only as 2.9e-4. A reshape is layout-sensitive
(the delegate converts back to NCHW before it), so (B, C, H, W) → (B·C, H, W) → softmax(-1) → back
is the same arithmetic on rows that are contiguous again. Last in the ``pte`` pipeline, after the
passes that cancel or merge reshapes.
"""

from __future__ import annotations

import torch.fx as fx

from .base import Pass, PassContext, aten, replace_node, shape

_SOFTMAX = {aten.softmax.int, aten._softmax.default}


class SoftmaxRows(Pass):
    name = "softmax_rows"
    summary = "4-D softmax over the last dim on a 3-D view (XNNPACK's channels-last softmax takes the wrong axis)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        g = gm.graph
        for n in list(g.nodes):
            if n.op != "call_function" or n.target not in _SOFTMAX:
                continue
            xs = shape(n.args[0])
            if xs is None or len(xs) != 4 or n.args[1] % 4 != 3:
                continue
            b, c, h, w = xs
            with g.inserting_before(n):
                rows = g.call_function(aten.reshape.default, (n.args[0], [b * c, h, w]))
                y = g.call_function(aten.softmax.int, (rows, -1))
                y = g.call_function(aten.reshape.default, (y, list(xs)))
            replace_node(n, y)
            changed += 1
        return changed
