"""fold_batchnorm: BatchNorm folded into the convolution before it, or the Linear after it.

At inference a BatchNorm is a per-channel scale and shift. Folded into the neighbouring conv or
linear it costs nothing; left alone it is an extra full pass over the activation in memory, which
is what dominates latency on phones. Conv→BN (SHViT's Conv2d_BN everywhere) folds into the conv's
weight and bias; BN→Linear (SHViT's classification head) folds into the Linear's weight and bias.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import Pass, PassContext, add_constant, aten, constant_value


def _bn_affine(gm, bn: fx.Node):
    """(scale, shift) of an inference-mode batch_norm node, or None if it is not foldable."""
    if bn.target is aten.batch_norm.default:
        _x, w, b, mean, var, training, _mom, eps = bn.args[:8]
    elif bn.target is aten._native_batch_norm_legit_no_training.default:
        _x, w, b, mean, var, _mom, eps = bn.args[:7]
        training = False
    else:
        return None
    if training:
        return None
    mean, var = constant_value(gm, mean), constant_value(gm, var)
    if mean is None or var is None:
        return None
    w = constant_value(gm, w) if w is not None else torch.ones_like(mean)
    b = constant_value(gm, b) if b is not None else torch.zeros_like(mean)
    if w is None or b is None:
        return None
    scale = w.double() / torch.sqrt(var.double() + eps)
    shift = b.double() - mean.double() * scale
    return scale, shift


def _output(bn: fx.Node) -> fx.Node:
    """The node carrying the BN result (``_native_batch_norm_legit_no_training`` returns a tuple)."""
    if bn.target is aten._native_batch_norm_legit_no_training.default:
        users = list(bn.users)
        return users[0] if len(users) == 1 else None
    return bn


class FoldBatchNorm(Pass):
    name = "fold_batchnorm"
    summary = "conv→BN and BN→linear folded into weights (one op instead of two passes over memory)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        for bn in list(gm.graph.nodes):
            if bn.op != "call_function":
                continue
            aff = _bn_affine(gm, bn)
            out = _output(bn) if aff else None
            if out is None:
                continue
            scale, shift = aff
            src = bn.args[0]
            if self._fold_into_conv(gm, src, out, scale, shift) or self._fold_into_linear(gm, bn, out, scale, shift):
                changed += 1
        return changed

    def _fold_into_conv(self, gm, conv, out, scale, shift) -> bool:
        if not (isinstance(conv, fx.Node) and conv.target is aten.conv2d.default and len(conv.users) == 1):
            return False
        args = list(conv.args) + [None] * (7 - len(conv.args))
        w = constant_value(gm, args[1])
        if w is None:  # a weight computed from the input (or an input itself): left alone
            return False
        b = constant_value(gm, args[2]) if args[2] is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        if b is None:
            return False
        new_w = (w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype)
        new_b = (b.double() * scale + shift).to(w.dtype)
        args[1] = add_constant(gm, conv, new_w, "folded_w")
        args[2] = add_constant(gm, conv, new_b, "folded_b")
        conv.args = tuple(a for a in args[: max(3, len(conv.args))])
        out.replace_all_uses_with(conv)
        return True

    def _fold_into_linear(self, gm, bn, out, scale, shift) -> bool:
        users = list(out.users)
        if len(users) != 1 or users[0].target is not aten.linear.default or users[0].args[0] is not out:
            return False
        val = bn.args[0].meta.get("val")
        if val is None or val.dim() != 2:  # per-feature BN on (N, C) only
            return False
        lin = users[0]
        w = constant_value(gm, lin.args[1])
        if w is None:  # a weight computed from the input (or an input itself): left alone
            return False
        has_bias = len(lin.args) > 2 and lin.args[2] is not None
        b = constant_value(gm, lin.args[2]) if has_bias else torch.zeros(w.shape[0], dtype=w.dtype)
        if b is None:
            return False
        new_w = (w.double() * scale.view(1, -1)).to(w.dtype)
        new_b = (b.double() + w.double() @ shift).to(w.dtype)
        lin.args = (bn.args[0], add_constant(gm, lin, new_w, "folded_w"), add_constant(gm, lin, new_b, "folded_b"))
        return True
