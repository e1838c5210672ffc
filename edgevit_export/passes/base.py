"""What every pass shares: the Pass interface, graph statistics, shape annotation, rewiring.

A pass works on the unlifted ``fx.GraphModule`` of a ``torch.export`` capture (``ep.module()``):
ATen ops as ``call_function`` nodes, weights as ``get_attr`` nodes. ``node.meta['val']`` holds a
tensor whose ``.shape``/``.dtype`` are the node's output; :func:`annotate` refreshes it by running
the graph on the example inputs, so a pass may rely on shapes of every node.
"""

from __future__ import annotations

import collections
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

aten = torch.ops.aten

RESHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default,
}
PERMUTE_OPS = {aten.permute.default, aten.transpose.int, aten.t.default}
LAYOUT_OPS = RESHAPE_OPS | PERMUTE_OPS | {aten.contiguous.default, aten.clone.default}


class PassRefused(Exception):
    """A pass cannot apply without changing numbers (or at all) here; the message says why."""


@dataclass
class PassContext:
    """What a pass may know besides the graph: example inputs and the model's metadata."""

    example_inputs: tuple
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_scale: float = 255.0  # normalize_input: raw pixels in [0, input_scale]


class Pass:
    """A named graph rewrite. Subclasses set ``name``, ``summary`` and implement ``apply``."""

    name: str = ""
    summary: str = ""

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        """Rewrite ``gm`` in place; return how many rewrites were made. Raise PassRefused."""
        raise NotImplementedError

    def reference_input(self, x: torch.Tensor, ctx: PassContext) -> torch.Tensor:
        """The input the original program must see to match the rewritten one fed ``x``
        (identity except for passes that change the input contract)."""
        return x

    def sample_input(self, ctx: PassContext) -> torch.Tensor | None:
        """An input in the domain the rewritten program expects (None: ctx.example_inputs)."""
        return None


@dataclass
class GraphStats:
    nodes: int = 0
    reshape: int = 0
    permute: int = 0
    max_rank: int = 0
    dynamic: int = 0
    by_op: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "reshape": self.reshape, "permute": self.permute,
                "max_rank": self.max_rank, "dynamic": self.dynamic, "by_op": self.by_op}


def op_name(node: fx.Node) -> str:
    t = node.target
    if hasattr(t, "_overloadpacket"):
        return str(t._overloadpacket.__name__)
    return getattr(t, "__name__", str(t))


def graph_stats(gm: fx.GraphModule) -> GraphStats:
    s = GraphStats()
    by_op: collections.Counter = collections.Counter()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is operator.getitem:
            continue
        s.nodes += 1
        by_op[op_name(n)] += 1
        if n.target in RESHAPE_OPS:
            s.reshape += 1
        elif n.target in PERMUTE_OPS:
            s.permute += 1
        if _is_sym(n):
            s.dynamic += 1
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            s.max_rank = max(s.max_rank, v.dim())
    s.by_op = dict(sorted(by_op.items(), key=lambda kv: (-kv[1], kv[0])))
    return s


def _is_sym(n: fx.Node) -> bool:
    if n.target in (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int):
        return True
    v = n.meta.get("val")
    return isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))


def shape(n) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


class _Annotator(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["val"] = torch.empty(out.shape, dtype=out.dtype, device="meta")
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            n.meta["val"] = [torch.empty(o.shape, dtype=o.dtype, device="meta") for o in out]
        elif isinstance(out, (int, float, bool)):
            n.meta["val"] = out
        return out


@torch.no_grad()
def annotate(gm: fx.GraphModule, inputs: tuple):
    """Run ``gm`` on ``inputs``, store every node's output shape in ``meta['val']``; return outputs."""
    return _Annotator(gm).run(*inputs)


def swaps_last_two(n) -> bool:
    """Whether ``n`` is a transpose/permute that swaps its input's last two axes and nothing else."""
    if not (isinstance(n, fx.Node) and n.op == "call_function"):
        return False
    s = shape(n.args[0])
    if s is None or len(s) < 2:
        return False
    r = len(s)
    if n.target is aten.transpose.int:
        return sorted([n.args[1] % r, n.args[2] % r]) == [r - 2, r - 1]
    if n.target is aten.permute.default:
        return [p % r for p in n.args[1]] == list(range(r - 2)) + [r - 1, r - 2]
    return False


def add_constant(gm: fx.GraphModule, before: fx.Node, value: torch.Tensor, hint: str) -> fx.Node:
    """Register ``value`` as a buffer of ``gm`` and insert a get_attr node for it before ``before``."""
    i = 0
    while hasattr(gm, f"_{hint}_{i}"):
        i += 1
    name = f"_{hint}_{i}"
    gm.register_buffer(name, value.detach().clone().contiguous())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = torch.empty(value.shape, dtype=value.dtype, device="meta")
    return node


_PURE_LAYOUT = {aten.reshape.default, aten.view.default, aten.permute.default, aten.transpose.int,
                aten.unsqueeze.default, aten.squeeze.dim, aten.flatten.using_ints, aten.t.default,
                aten.contiguous.default, aten.clone.default, aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor,
                aten.sub.Tensor, aten.neg.default}


def constant_value(gm: fx.GraphModule, n, depth: int = 0) -> torch.Tensor | None:
    """The value of a node computed from weights alone (a get_attr, or a reshape/transpose/
    arithmetic of get_attrs, as in ``weight.reshape(o, -1, 1, 1)``); None if it depends on input."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "get_attr":
        obj = gm
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        return obj.detach() if isinstance(obj, torch.Tensor) else None
    if n.op == "call_function" and n.target in _PURE_LAYOUT and depth < 4:
        args = []
        for a in n.args:
            if isinstance(a, fx.Node):
                v = constant_value(gm, a, depth + 1)
                if v is None:
                    return None
                args.append(v)
            else:
                args.append(a)
        with torch.no_grad():
            return n.target(*args, **n.kwargs)
    return None


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Rewire every use of ``old`` to ``new`` (which takes over its shape, so later rewrites in
    the same pass can read it) and drop ``old``. The nodes written for it inherit its provenance
    (:func:`inherit_provenance`)."""
    inherit_provenance(old, new)
    new.meta["val"] = old.meta.get("val")
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def inherit_provenance(old: fx.Node, new: fx.Node) -> None:
    """Give ``new`` and the fresh nodes it was built from (no module, no tag yet) the module of
    ``old`` and ``meta['custom']['replaces']``; the pipeline adds the pass's name as ``written_by``.
    Both survive ``torch.export``, so a quantizer or a profile can tell which nodes a rewrite wrote
    (the quantizers keep decompose_norms' statistics in float)."""
    stack, trace = old.meta.get("nn_module_stack"), old.meta.get("stack_trace")
    todo, seen = [new], set()
    while todo:
        n = todo.pop()
        if n in seen or n is old or n.op != "call_function" or "nn_module_stack" in n.meta or "custom" in n.meta:
            continue
        seen.add(n)
        if stack is not None:
            n.meta["nn_module_stack"] = dict(stack)
        if trace is not None:
            n.meta["stack_trace"] = trace
        n.meta["custom"] = {"replaces": op_name(old)}
        todo.extend(a for a in n.all_input_nodes)


def written_by(n: fx.Node) -> str | None:
    """The pass that wrote ``n`` (None for a node of the captured program)."""
    custom = n.meta.get("custom")
    return custom.get("written_by") if isinstance(custom, dict) else None


def finish(gm: fx.GraphModule) -> None:
    """Drop dead nodes and unused weights, lint and regenerate code."""
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if name.startswith("_") and "." not in name and name not in used:
            delattr(gm, name)
    gm.graph.lint()
    gm.recompile()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's scale (max |b|)."""
    a, b = a.detach().float(), b.detach().float()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)
