"""token_maps: tokens ↔ feature maps as reshape + permute, the order LiteRT's layout handling folds.

Vision transformers with convolutions between attention blocks move between tokens (B, N, C) and
maps (B, C, H, W) as ``x.transpose(1, 2).reshape(B, C, H, W)`` and back as
``x.flatten(2).transpose(1, 2)``. litert-torch runs convolutions in NHWC and wraps each in
NCHW↔NHWC transposes; with the swap on the token side, nothing cancels and every hop costs full-size
transposes (LITv2-S at 224: 143 TRANSPOSE moving 28.3 M elements). Written as
``x.reshape(B, H, W, C).permute(0, 3, 1, 2)`` (and ``x.permute(0, 2, 3, 1).reshape(B, N, C)``),
the permute meets the converter's own inverse transpose and both disappear (72 transposes, 3.5 M
elements). Pure data movement: exact.
"""

from __future__ import annotations

import torch.fx as fx

from .base import Pass, PassContext, aten, replace_node, shape, swaps_last_two

_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.flatten.using_ints)


def _swaps_last_two_of_rank3(n) -> bool:
    s = shape(n.args[0]) if isinstance(n, fx.Node) and n.args else None
    return s is not None and len(s) == 3 and swaps_last_two(n)


class TokenMaps(Pass):
    name = "token_maps"
    summary = "tokens ↔ NCHW maps as reshape + permute (LiteRT folds the permute into its NHWC transposes)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        g = gm.graph
        changed = 0
        for n in list(g.nodes):
            if n.graph is not g or n.op != "call_function" or len(n.users) != 1:
                continue
            (user,) = n.users
            if _swaps_last_two_of_rank3(n) and user.target in _RESHAPES:      # tokens → map
                (b, tokens, c), out = shape(n.args[0]), shape(user)
                if out is None or len(out) != 4 or out[:2] != (b, c) or out[2] * out[3] != tokens:
                    continue
                with g.inserting_before(user):
                    nhwc = g.call_function(aten.reshape.default, (n.args[0], [b, out[2], out[3], c]))
                    new = g.call_function(aten.permute.default, (nhwc, [0, 3, 1, 2]))
                replace_node(user, new)
                g.erase_node(n)
                changed += 1
            elif n.target in _RESHAPES and _swaps_last_two_of_rank3(user):     # map → tokens
                src, out = shape(n.args[0]), shape(n)
                if src is None or len(src) != 4 or out != (src[0], src[1], src[2] * src[3]):
                    continue
                with g.inserting_before(user):
                    nhwc = g.call_function(aten.permute.default, (n.args[0], [0, 2, 3, 1]))
                    new = g.call_function(aten.reshape.default, (nhwc, [src[0], src[2] * src[3], src[1]]))
                replace_node(user, new)
                g.erase_node(n)
                changed += 1
        return changed
