"""normalize_input: ImageNet mean/std applied exactly inside the graph; feed raw pixels.

Apps hand a model raw pixels (0–255 from a CVPixelBuffer, or 0–1). Core ML's ImageType has one
scale for all channels, so ImageNet's per-channel std cannot be expressed there exactly. This pass
puts ``(x / scale − mean) / std`` into the graph. Where the first convolution has no padding the
affine map is folded into its weights and bias (exact: there is no border where a padded zero
would differ). Otherwise it stays as one op: a 1×1 depthwise convolution with per-channel scale
and bias, exact at every pixel.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import Pass, PassContext, add_constant, aten, constant_value


class NormalizeInput(Pass):
    name = "normalize_input"
    summary = "mean/std inside the graph: raw 0–255 input; folded into the first conv only where exact"

    def _affine(self, ctx):
        std = torch.tensor(ctx.std, dtype=torch.float64)
        mean = torch.tensor(ctx.mean, dtype=torch.float64)
        return 1.0 / (ctx.input_scale * std), -mean / std

    def reference_input(self, x, ctx):
        a, b = self._affine(ctx)
        return (x.double() * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)).to(x.dtype)

    def sample_input(self, ctx):
        x = ctx.example_inputs[0]
        g = torch.Generator().manual_seed(0)
        return torch.rand(x.shape, generator=g, dtype=x.dtype) * ctx.input_scale

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        a, b = self._affine(ctx)
        users = [u for u in x.users if u.op == "call_function"]
        if len(users) == 1 and self._fold(gm, x, users[0], a, b):
            return 1
        first = users[0] if users else x.next
        w = add_constant(gm, first, a.float().view(-1, 1, 1, 1), "norm_scale")
        bias = add_constant(gm, first, b.float(), "norm_bias")
        with gm.graph.inserting_before(first):
            y = gm.graph.call_function(aten.conv2d.default, (x, w, bias, [1, 1], [0, 0], [1, 1], a.numel()))
        for u in users:
            u.replace_input_with(x, y)
        return 1

    @staticmethod
    def _fold(gm, x, conv, a, b) -> bool:
        if conv.target is not aten.conv2d.default or conv.args[0] is not x:
            return False
        args = list(conv.args) + [None] * (7 - len(conv.args))
        stride, padding, dilation, groups = args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1], args[6] or 1
        if any(p != 0 for p in padding) or groups != 1:
            return False
        w = constant_value(gm, args[1])
        if w is None:  # a weight computed from the input (or an input itself): not folded into
            return False
        bias = constant_value(gm, args[2]) if args[2] is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        if bias is None:
            return False
        new_w = w.double() * a.view(1, -1, 1, 1)
        new_b = bias.double() + (w.double() * b.view(1, -1, 1, 1)).sum((1, 2, 3))
        args[1] = add_constant(gm, conv, new_w.to(w.dtype), "folded_w")
        args[2] = add_constant(gm, conv, new_b.to(w.dtype), "folded_b")
        args[3:7] = [stride, padding, dilation, groups]
        conv.args = tuple(args)
        return True
