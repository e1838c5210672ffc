"""Measured figures: parameters by counting, MACs with torch.utils.flop_counter, stage shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def skeleton(builder, **kwargs) -> nn.Module:
    """The model built on the meta device (no memory, no init cost) for counting params, MACs and
    shapes; built normally where a model computes tensors in its constructor."""
    try:
        with torch.device("meta"):
            return builder(**kwargs).eval()
    except (NotImplementedError, RuntimeError):
        return builder(**kwargs).eval()


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def program_params(program: torch.export.ExportedProgram) -> int:
    """Parameters a captured program reads (a backbone capture leaves the classifier's unused)."""
    from torch.export.graph_signature import InputKind

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    state = program.state_dict
    return sum(state[s.target].numel() for s in program.graph_signature.input_specs
               if s.kind == InputKind.PARAMETER and placeholders[s.arg.name].users)


@torch.no_grad()
def count_macs(model: nn.Module, res: tuple[int, int], batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass (FlopCounterMode counts 2 FLOPs per MAC)."""
    model.eval()
    x = torch.zeros(batch, 3, *res, device=_device(model))
    # normalisation layers keep their input's shape and hold no MACs the counter counts, but it
    # decomposes them op by op: skipping them halves the time of 'list' and changes no count
    norms = [m for m in model.modules() if isinstance(m, _NORMS)]
    for m in norms:
        m.forward = _same
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m in norms:
            del m.forward
    return counter.get_total_flops() // 2


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class StageShape:
    name: str
    shape: tuple[int, ...]
    tokens: int
    channels: int


@torch.no_grad()
def stage_shapes(model: nn.Module, res: tuple[int, int]) -> list[StageShape]:
    """Output shape of each stage (models name their stages in ``model.stage_names``)."""
    model.eval()
    out: list[StageShape] = []
    hooks = []
    for name in getattr(model, "stage_names", []):
        mod = model.get_submodule(name)

        def hook(_m, _i, o, name=name):
            t = o[0] if isinstance(o, (tuple, list)) else o
            shape = tuple(t.shape)
            if len(shape) == 4:
                tokens, ch = shape[2] * shape[3], shape[1]
            else:  # (B, N, C) token layout
                tokens, ch = shape[1], shape[-1]
            out.append(StageShape(name, shape, tokens, ch))

        hooks.append(mod.register_forward_hook(hook))
    try:
        model(torch.zeros(1, 3, *res, device=_device(model)))
    finally:
        for h in hooks:
            h.remove()
    return out


@torch.no_grad()
def feature_shapes(model: nn.Module, res: tuple[int, int]) -> list[tuple[int, ...]]:
    """The shape of each map in ``model.feature_info`` at ``res`` (as ``export --features`` outputs them)."""
    model.eval()
    outs = model.forward_intermediates(torch.zeros(1, 3, *res, device=_device(model)),
                                       list(range(len(model.feature_info))))
    return [tuple(o.shape) for o in outs]
