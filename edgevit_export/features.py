"""Dense-prediction backbones: the multi-scale feature maps detection and segmentation heads take.

Every model describes its pyramid in ``model.feature_info`` (a list of :class:`Feature`, shallow
to deep: the maps its family's downstream heads take, as the official detection code or timm's
``feature_info`` defines them) and computes it with ``model.forward_intermediates(x, indices)``:
the maps at those positions, stopping after the deepest one asked for. :class:`Backbone` wraps a
model so that its forward returns those maps: the program ``export --features`` captures, with
outputs named by stride (``feat_s16``, ``feat_s32``, …).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .errors import EdgeExportError


@dataclass(frozen=True)
class Feature:
    """One output of a backbone: ``name`` (``feat_s<stride>``), the stride over the input, the
    channel count, and the module of ours whose output it is (before any norm the family adds)."""

    stride: int
    channels: int
    module: str
    norm: str = ""        # the norm applied to this output only (a detection backbone's extra norm)

    @property
    def name(self) -> str:
        return f"feat_s{self.stride}"

    def as_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def feature_info(model: nn.Module) -> list[Feature]:
    return list(model.feature_info)


def select(model: nn.Module, spec: str | None) -> list[int]:
    """``--features`` → positions in ``model.feature_info``: all for ``""``/``"all"``, else a comma
    list of names (``s16,s32`` or ``feat_s16,feat_s32``, any order); unknown names refused with the ones there are."""
    info = feature_info(model)
    names = [f.name for f in info]
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(len(info)))
    picked = []
    for part in (p.strip().lower() for p in spec.split(",")):
        if not part:
            continue
        name = part if part.startswith("feat_") else f"feat_{part}"
        if name not in names:
            short = ", ".join(n[len("feat_"):] for n in names)
            raise EdgeExportError(f"--features: this model has no '{part}' output; it has {short} "
                                  f"(e.g. --features {names[-2][5:] + ',' if len(names) > 1 else ''}{names[-1][5:]})")
        picked.append(names.index(name))
    if not picked:
        raise EdgeExportError("--features: give output names such as s16,s32, or 'all'")
    return sorted(set(picked))


class Backbone(nn.Module):
    """``model`` without pooling and classifier: forward returns the selected feature maps, shallow
    to deep (a tuple, one per selected :class:`Feature`)."""

    def __init__(self, model: nn.Module, indices: list[int]):
        super().__init__()
        self.model = model
        self.indices = list(indices)
        self.features = [feature_info(model)[i] for i in self.indices]

    @property
    def output_names(self) -> list[str]:
        return [f.name for f in self.features]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.forward_intermediates(x, self.indices))


def tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, h·w, C) tokens → the (B, C, h, w) map they were flattened from."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])


def stage_outputs(stages: nn.Sequential, x: torch.Tensor, indices) -> list[torch.Tensor]:
    """Run ``stages`` in turn on the stem's output ``x`` up to the deepest of ``indices``; the outputs of
    the stages at ``indices`` (for families whose ``feature_info`` is one entry per stage)."""
    outs = []
    for i, stage in enumerate(stages[:max(indices) + 1]):
        x = stage(x)
        if i in indices:
            outs.append(x)
    return outs
