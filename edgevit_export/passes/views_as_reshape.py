"""views_as_reshape: unsqueeze / squeeze written as the reshape they are.

ExecuTorch's XNNPACK partitioner takes ``view_copy`` of any static shape but ``unsqueeze_copy``
only on the trailing dim and no ``squeeze_copy`` at all; each one it refuses runs on a portable
kernel and splits the graph. Inserting or dropping a size-1 dim moves no element, so a reshape to
the same shape is the same tensor.
"""

from __future__ import annotations

import torch.fx as fx

from .base import Pass, PassContext, aten, replace_node, shape

_VIEWS = {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}


class ViewsAsReshape(Pass):
    name = "views_as_reshape"
    summary = "unsqueeze/squeeze as a reshape to the same shape (XNNPACK takes reshapes)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        g = gm.graph
        for n in list(g.nodes):
            if n.op != "call_function" or n.target not in _VIEWS or shape(n) is None:
                continue
            with g.inserting_before(n):
                r = g.call_function(aten.reshape.default, (n.args[0], list(shape(n))))
            replace_node(n, r)
            changed += 1
        return changed
