"""matmul_to_bmm: batched ``@`` of equal batch shapes as one 3-D ``bmm`` between reshapes.

``q @ k.transpose(-2, -1)`` on (B, heads, N, d) tensors captures as ``aten.matmul``; lowering
decomposes it into ``expand`` + ``view`` + ``bmm``, and the ``expand`` (a no-op here, both sides
already have the same batch shape) is one of the ops ExecuTorch's XNNPACK partitioner does not
take: every attention product becomes a delegate boundary. Written as reshape → ``bmm`` → reshape
from the start, the product runs inside XNNPACK and computes the same sums.
"""

from __future__ import annotations

import math

import torch.fx as fx

from .base import Pass, PassContext, aten, replace_node, shape


class MatmulToBmm(Pass):
    name = "matmul_to_bmm"
    summary = "batched matmul (equal batch shapes, rank ≥ 3) as reshape → bmm → reshape (no expand)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        g = gm.graph
        for n in list(g.nodes):
            if n.op != "call_function" or n.target is not aten.matmul.default:
                continue
            a, b = n.args[:2]
            sa, sb, so = shape(a), shape(b), shape(n)
            if sa is None or sb is None or so is None or len(sa) < 3 or len(sb) < 3:
                continue
            if sa[:-2] != sb[:-2]:   # broadcasting batch dims: the expand is real work
                continue
            batch = math.prod(sa[:-2])
            with g.inserting_before(n):
                a3 = a if len(sa) == 3 else g.call_function(aten.reshape.default, (a, [batch, sa[-2], sa[-1]]))
                b3 = b if len(sb) == 3 else g.call_function(aten.reshape.default, (b, [batch, sb[-2], sb[-1]]))
                out = g.call_function(aten.bmm.default, (a3, b3))
                if len(so) != 3:
                    out = g.call_function(aten.reshape.default, (out, list(so)))
            replace_node(n, out)
            changed += 1
        return changed
