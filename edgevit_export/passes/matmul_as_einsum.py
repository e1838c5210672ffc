"""matmul_as_einsum: a product of two activations (``q @ k.T``, ``attn @ v``) as ``aten.einsum``.

litert-torch folds ``x @ y.transpose(-2, -1)`` with a batch of one (SHViT's single-head
``v @ attn.T``, any ``mm``) into TFLite's FULLY_CONNECTED with ``y`` as the weights. LiteRT's
XNNPACK delegate takes FULLY_CONNECTED only with constant weights, so every such product runs on
the builtin kernels and cuts the delegate in two (SHViT-S4: 13 products, 14 partitions).
``torch.export`` keeps ``einsum`` as one op, and litert-torch lowers it straight to a
``dot_general``: TFLite's BATCH_MATMUL, which XNNPACK runs with both operands computed at run time.
A transposed right operand (``q @ k.transpose(-2, -1)``) goes into the equation itself
(``…ik,…jk->…ij``: BATCH_MATMUL with adj_y, no TRANSPOSE). Products with a weight (``linear``, a
constant operand) stay as they are: FULLY_CONNECTED with constant weights is what XNNPACK wants.
Same sums, same order: exact.
"""

from __future__ import annotations

import string

import torch.fx as fx

from .base import Pass, PassContext, aten, constant_value, replace_node, shape, swaps_last_two

_PRODUCTS = (aten.matmul.default, aten.bmm.default, aten.mm.default)


def _equation(rank: int, transposed: bool) -> str:
    """``ab…xy,ab…yz->ab…xz`` for two operands of the same rank (``ab…xy,ab…zy`` with the right
    operand given untransposed)."""
    batch = string.ascii_lowercase[:rank - 2]
    return f"{batch}xy,{batch}{'zy' if transposed else 'yz'}->{batch}xz"


class MatmulAsEinsum(Pass):
    name = "matmul_as_einsum"
    summary = "products of two activations as einsum (LiteRT: BATCH_MATMUL inside XNNPACK, not FULLY_CONNECTED)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        g = gm.graph
        for n in list(g.nodes):
            if n.op != "call_function" or n.target not in _PRODUCTS:
                continue
            a, b = n.args[:2]
            sa, sb = shape(a), shape(b)
            if sa is None or sb is None or len(sa) != len(sb) or len(sa) < 2 or sa[:-2] != sb[:-2]:
                continue   # broadcasting or vector products: left as they are
            if constant_value(gm, a) is not None or constant_value(gm, b) is not None:
                continue   # a weight: FULLY_CONNECTED with constant weights is what the delegate wants
            transposed = swaps_last_two(b)
            with g.inserting_before(n):
                out = g.call_function(aten.einsum.default, (_equation(len(sa), transposed),
                                                            [a, b.args[0] if transposed else b]))
            replace_node(n, out)
            changed += 1
        return changed
