"""fold_constants: what the weights alone determine is computed once, at export.

Models build tensors that do not depend on the input: sampling grids from ``arange``/``stack``/
``repeat`` (LITv2's deformable token merging), attention-bias tables gathered by constant indices
(EfficientFormer, EfficientViT), scalars made with ``torch.tensor`` and cast with ``.to``. Left in
the graph they run on every inference, and ExecuTorch's XNNPACK delegate takes none of these ops
(``arange``, ``index``, ``repeat``, ``_to_dim_order_copy``), so each one cuts the graph into
another delegate. Each such subgraph is evaluated here and replaced by one constant; asserts on
constants (``_assert_tensor_metadata``) go with them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import Pass, PassContext, add_constant, aten

MAX_BYTES = 64 * 2**20     # a folded constant larger than this stays computed (file size)
_NEVER = {aten.rand.default, aten.randn.default, aten.rand_like.default, aten.randn_like.default,
          aten.dropout.default, aten.bernoulli.default, aten.normal.Tensor_float}
_ASSERTS = {aten._assert_tensor_metadata.default}


def _keeps(n: fx.Node) -> bool:
    """Ops never folded: random ones, and quantize/dequantize (an int8 weight's dequantize is the
    quantization itself — folded, the weight would be float again)."""
    return n.target in _NEVER or "quantize" in getattr(n.target, "__name__", str(n.target))


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class FoldConstants(Pass):
    name = "fold_constants"
    summary = "subgraphs computed from weights alone (grids, gathered bias tables, casts) folded to constants"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        values: dict[fx.Node, object] = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                v = _attr(gm, str(n.target))
                if isinstance(v, torch.Tensor):
                    values[n] = v.detach()
            elif n.op == "call_function" and not _keeps(n) and n.target not in _ASSERTS:
                inputs = n.all_input_nodes
                if any(a not in values for a in inputs):
                    continue
                args = fx.node.map_arg(n.args, lambda a: values[a])
                kwargs = fx.node.map_arg(n.kwargs, lambda a: values[a])
                try:
                    with torch.no_grad():
                        value = n.target(*args, **kwargs)
                except Exception:
                    continue
                if isinstance(value, (torch.Tensor, tuple, list)):
                    values[n] = value
        changed = 0
        for n in list(gm.graph.nodes):
            if n.op == "call_function" and n.target in _ASSERTS and n.args and n.args[0] in values:
                gm.graph.erase_node(n)
                changed += 1
        for n in list(gm.graph.nodes):
            if n.op != "call_function" or n not in values or not isinstance(values[n], torch.Tensor):
                continue
            v = values[n]
            if v.numel() * v.element_size() > MAX_BYTES:
                continue
            users = [u for u in n.users if u not in values or not isinstance(values[u], torch.Tensor)]
            if not users:
                continue
            const = add_constant(gm, n, v, "folded")
            for u in users:
                u.replace_input_with(n, const)
            changed += 1
        return changed
