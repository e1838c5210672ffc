"""batchnorm_as_affine: an inference BatchNorm that no conv or linear absorbs, as x * scale + shift.

``fold_batchnorm`` folds BN into the conv before it or the linear after it. What is left — a BN that
opens a block (EdgeViT's pre-norm before a padded conv), or one on a 2-D tensor — stays a
BatchNormalization op, which ORT Mobile's CoreML (ML Program) execution provider does not take: each
is a partition boundary. In inference BN is a per-channel affine map, so it is written as one
multiply and one add by constants (the same two roundings BatchNormalization does).
"""

from __future__ import annotations

import torch.fx as fx

from .base import Pass, PassContext, add_constant, aten, replace_node, shape
from .fold_batchnorm import _bn_affine, _output


class BatchNormAsAffine(Pass):
    name = "batchnorm_as_affine"
    summary = "BatchNorm left after fold_batchnorm as a per-channel multiply and add"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        g = gm.graph
        for n in list(g.nodes):
            if n.op != "call_function" or n.target not in (aten.batch_norm.default,
                                                           aten._native_batch_norm_legit_no_training.default):
                continue
            affine = _bn_affine(gm, n)
            out = _output(n)
            xs = shape(n.args[0])
            if affine is None or out is None or xs is None or len(xs) < 2:
                continue
            dtype = n.args[0].meta["val"].dtype
            scale, shift = (t.to(dtype) for t in affine)
            view = [xs[1]] + [1] * (len(xs) - 2)
            s = add_constant(gm, n, scale.reshape(view), "bn_scale")
            b = add_constant(gm, n, shift.reshape(view), "bn_shift")
            with g.inserting_before(n):
                y = g.call_function(aten.add.Tensor, (g.call_function(aten.mul.Tensor, (n.args[0], s)), b))
            replace_node(out, y)
            if n in g.nodes and not n.users:
                g.erase_node(n)
            changed += 1
        return changed
