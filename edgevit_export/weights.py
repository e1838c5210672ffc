"""Checkpoint loading: safe ``torch.load`` or safetensors, unwrapping, layout mapping, clear errors.

A checkpoint is data, never code: always ``weights_only=True``; ``.safetensors`` files (what the
Hugging Face hub serves for timm's models) hold only tensors by construction. Official checkpoints come wrapped
(``{'model': sd}``, ``{'state_dict': sd}``, ``{'model_ema': sd}``) and sometimes with a
``module.`` prefix from DataParallel; timm checkpoints use timm's parameter names, which each model
family maps to ours with its ``convert_state_dict``. Loading is strict: every key must match.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

from .errors import WeightsError, first_line

# This module knows nothing of the registry (registry.create_model uses it, never the reverse):
# a family's layout mapping reaches it as anything with a ``convert_state_dict`` (a ModelInfo).


class HasLayout(Protocol):
    convert_state_dict: Callable[[dict], dict] | None

_WRAPPERS = ("model", "state_dict", "model_ema", "module", "net")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict of tensors (no model needed)."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"weights file not found: {p}")
    if not p.is_file():
        raise WeightsError(f"weights path is not a file: {p}")
    if _is_safetensors(p):
        return _finite(unwrap_state_dict(_read_safetensors(p), source=str(p)), p)
    try:
        # Training scripts (DeiT-style main.py) store their argparse Namespace beside the weights:
        # plain data, safe to allow. Anything else that is not tensors/containers is refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if not m:
            raise WeightsError(f"{p} is not a readable PyTorch checkpoint; pass a .pth/.pt saved with torch.save or a .safetensors file") from None
        what = f"a pickled {m.group(1)} object"
        raise WeightsError(
            f"{p} holds {what}, which is never unpickled (a checkpoint is data, not code); re-save just the "
            f"weights: torch.save({{'model': ckpt['model']}}, 'clean.pth') in the environment that made it"
        ) from None
    except Exception as e:  # any failure to parse a file the user named is bad input, not a bug
        first = first_line(e)
        raise WeightsError(
            f"{p} is not a readable PyTorch checkpoint ({_why_unreadable(p, e, first)}); "
            "pass a .pth/.pt saved with torch.save or a .safetensors file"
        ) from None
    return _finite(unwrap_state_dict(obj, source=str(p)), p)


CLASS_KEYS = ("classes", "class_names", "labels")


def checkpoint_classes(path: str | Path) -> list[str] | None:
    """The class names a checkpoint carries beside its weights (``{'model': sd, 'classes': [...]}``,
    as ``train-shapes`` saves; a .safetensors file's ``classes`` metadata, JSON), or None."""
    import json

    p = Path(path).expanduser()
    try:
        if _is_safetensors(p):
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                raw = (f.metadata() or {}).get("classes")
            names = json.loads(raw) if raw else None
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            names = next((obj[k] for k in CLASS_KEYS if isinstance(obj, dict) and k in obj), None)
    except Exception:   # the weights themselves were read by read_checkpoint; names are optional
        return None
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) and n.strip() for n in names):
        return [n.strip() for n in names]
    return None


def _why_unreadable(p: Path, e: Exception, first: str) -> str:
    """What is wrong with the file, in a user's terms: torch.load's message for a file that is no
    checkpoint at all is the unpickler's (``KeyError: 137``: the first byte read as an opcode)."""
    with open(p, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head[:2] != b"PK" and head[:1] != b"\x80":
        return "neither a zip archive of torch.save nor a pickle: not a checkpoint file"
    if head[:2] == b"PK":
        return f"a zip archive torch.save did not write, or one cut short ({type(e).__name__}: {first[:120]})"
    return f"{type(e).__name__}: {first[:160]}"


def _finite(sd: dict[str, torch.Tensor], p: Path) -> dict[str, torch.Tensor]:
    """A checkpoint holding NaN or Inf is a broken file, not a model to export: say which tensor."""
    for k, v in sd.items():
        if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            kind = "NaN" if bool(torch.isnan(v).any()) else "Inf"
            raise WeightsError(f"{p}: tensor '{k}' holds {kind} ({bad:,} of {v.numel():,} values are not finite); "
                               "the checkpoint is corrupt or its training diverged — use another checkpoint")
    return sd


def _is_safetensors(p: Path) -> bool:
    """By content, not name: 8-byte little-endian header length, then the JSON header. (A
    torch.save file starts with a zip 'PK', a legacy one with a pickle opcode.)"""
    with open(p, "rb") as f:
        head = f.read(9)
    return p.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"
                                          and 0 < int.from_bytes(head[:8], "little") < p.stat().st_size)


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        first = first_line(e)
        raise WeightsError(f"{p} is not a readable .safetensors file ({first[:160]}); re-download or re-save it") from None


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not _is_state_dict(obj):
            inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        what = (f"a {type(obj).__name__}" if not isinstance(obj, dict) else
                "no tensors" if obj else "an empty dict")
        raise WeightsError(
            f"{source} holds {what}, not a state dict (expected tensors by name, or {{'model': state_dict}})"
        )
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) for k in d) and any(isinstance(v, torch.Tensor) for v in d.values())


def to_our_layout(sd: dict[str, torch.Tensor], info: HasLayout) -> dict[str, torch.Tensor]:
    """Map a foreign layout (timm's) to ours where the family knows how; ours passes through."""
    if info.convert_state_dict is not None:
        return info.convert_state_dict(sd)
    return sd


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Strict load with an error that names what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    # load_state_dict would cast an integer or bool tensor into a float parameter without a word
    dtype = [f"{k} is {str(sd[k].dtype).replace('torch.', '')}" for k in own
             if k in sd and own[k].is_floating_point() and not sd[k].is_floating_point()]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                        ("integer or bool where a float is needed", dtype)):
        if keys:
            shown = ", ".join(keys[:3]) + (f", +{len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    if problems:
        raise WeightsError(f"{source} does not fit {name}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


@torch.no_grad()
def calibrate_norm_stats(model: nn.Module, hw: tuple[int, int], seed: int = 0,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), batch: int = 16) -> None:
    """Set every BatchNorm's running statistics to what its input really has on seeded images
    of size ``hw`` (one train-mode forward, cumulative average), then eval().

    Random running statistics leave a randomly initialised network's activations mis-scaled, and
    its logits end up nearly independent of the image (SHViT-S1: 0.08% of the output varies with
    the input); a parity check on such a model mostly compares constants. Calibrated, 30–80% of the
    output varies with the input. The batch holds both kinds of input the checks feed: N(0, 1)
    tensors and uniformly random pixels normalised with ``mean``/``std`` (calibrated on one kind
    only, EfficientViT-M5 turns chaotic on the other: a 1e-6 input change moves its logits by 2%).
    16 images, because a BatchNorm1d in a head sees one sample per image.
    """
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, *hw, generator=g)
    pixels = torch.rand(batch // 2, 3, *hw, generator=g)
    x[batch // 2:] = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        model(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()


@torch.no_grad()
def randomize_norm_stats(model: nn.Module, seed: int = 0) -> None:
    """Give every norm layer random affine parameters and running statistics.

    Freshly initialised models zero many residual branches (BN weight 0) and use identity
    statistics, so a numeric check on them would exercise little of the graph. Exports without
    ``--weights`` call this and then :func:`calibrate_norm_stats`, which replaces the random
    BatchNorm statistics with measured ones (the affine parameters stay random).
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
