"""deconv_as_shuffle: EdgeViT's up- and down-sampling as ops LiteRT's XNNPACK delegate takes.

- A depthwise transposed convolution whose kernel equals its stride (r × r windows that do not
  overlap: EdgeViT's local propagation) is, per channel c and offset (a, b) in the window,
  ``out[c, i·r + a, j·r + b] = x[c, i, j] · w[c, a, b] + bias[c]``: a 1×1 depthwise convolution
  with r² outputs per channel, then ``pixel_shuffle(r)``, then the bias. litert-torch lowers the
  grouped transposed convolution as one TRANSPOSE_CONV per channel joined by a CONCATENATION of C
  inputs, which XNNPACK refuses (EdgeViT-XXS: 5 concatenations outside, each cutting the delegate);
  rewritten it is one DEPTHWISE_CONV_2D and a reshape/transpose, all inside.
- A 1×1 average pool with stride r (EdgeViT's delegate-token sampler: every r-th pixel) as a 1×1
  depthwise convolution with weight 1 and stride r: XNNPACK refuses a 1×1 pooling window.

Same products, same sums (one term each): exact.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import Pass, PassContext, add_constant, aten, constant_value, replace_node, shape


def _ints(v, n=2) -> list[int]:
    """An int or a list of ints as a list of ``n`` (``2`` and ``[2]`` are ``[2, 2]``)."""
    v = [v] if isinstance(v, int) else [int(d) for d in v]
    return v * n if len(v) == 1 else v


def _arg(n: fx.Node, i: int, default):
    return n.args[i] if len(n.args) > i and n.args[i] is not None else default


class DeconvAsShuffle(Pass):
    name = "deconv_as_shuffle"
    summary = "depthwise transposed conv (kernel = stride) as 1×1 depthwise conv + pixel_shuffle; 1×1 strided pool as conv"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        changed = 0
        g = gm.graph
        for n in list(g.nodes):
            if n.op != "call_function":
                continue
            if n.target is aten.conv_transpose2d.input:
                changed += self._deconv(gm, n)
            elif n.target is aten.avg_pool2d.default:
                changed += self._subsample(gm, n)
        return changed

    def _deconv(self, gm, n) -> int:
        x, w_node = n.args[:2]
        bias = _arg(n, 2, None)   # conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
        stride, padding, out_pad = _arg(n, 3, 1), _arg(n, 4, 0), _arg(n, 5, 0)
        groups, dilation = _arg(n, 6, 1), _arg(n, 7, 1)
        w, sx = constant_value(gm, w_node), shape(x)
        if w is None or sx is None or w.dim() != 4:
            return 0
        c, k = sx[1], w.shape[2]
        if (groups != c or w.shape[0] != c or w.shape[1] != 1 or w.shape[3] != k or _ints(stride) != [k, k]
                or any(_ints(padding)) or any(_ints(out_pad)) or _ints(dilation) != [1, 1]):
            return 0
        g = gm.graph
        w2 = add_constant(gm, n, w.reshape(c * k * k, 1, 1, 1), "deconv_weight")
        with g.inserting_before(n):
            out = g.call_function(aten.conv2d.default, (x, w2, None, [1, 1], [0, 0], [1, 1], c))
            out = g.call_function(aten.pixel_shuffle.default, (out, k))
            if bias is not None:
                out = g.call_function(aten.add.Tensor, (out, g.call_function(aten.reshape.default, (bias, [1, c, 1, 1]))))
        replace_node(n, out)
        return 1

    def _subsample(self, gm, n) -> int:
        x, kernel = n.args[:2]
        stride = _arg(n, 2, None) or kernel   # avg_pool2d(input, kernel, stride=[] (= kernel), padding, ceil_mode, …)
        padding, ceil = _arg(n, 3, 0), _arg(n, 4, False)
        sx = shape(x)
        if sx is None or len(sx) != 4 or _ints(kernel) != [1, 1] or any(_ints(padding)) or ceil:
            return 0
        c = sx[1]
        ones = add_constant(gm, n, torch.ones(c, 1, 1, 1, dtype=n.meta["val"].dtype), "subsample_weight")
        with gm.graph.inserting_before(n):
            out = gm.graph.call_function(aten.conv2d.default, (x, ones, None, _ints(stride), [0, 0], [1, 1], c))
        replace_node(n, out)
        return 1
