"""Model names → constructors and metadata.

Each model family file calls :func:`register_model` once per variant. Metadata holds what a user
needs to pick and feed a model (default resolution, normalisation, which sizes it takes) and the
paper's own figures, which are always labelled as the paper's: our own params/MACs are measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .errors import ResolutionError, UnknownModelError
from . import weights as _weights  # one way: weights.py knows nothing of the registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resampling filters the eval transform can use (calibration.data maps the names to PIL's).
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    paper: str
    builder: Callable[..., nn.Module] = field(repr=False)
    default_res: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # The eval transform the weights were measured with (timm's pretrained cfg / the official eval
    # script): resize the shorter side to floor(res / crop_pct) with this PIL filter, center-crop res.
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    preprocess_source: str = ""   # where crop_pct / interpolation / mean / std come from (shown by 'info')
    # The paper's figures at default_res (None where the paper gives none).
    paper_params_m: float | None = None
    paper_macs_m: float | None = None
    paper_top1: float | None = None
    # Which input sizes the architecture takes: H and W multiples of res_multiple, >= min_res.
    res_multiple: int = 32
    min_res: int = 64
    # How the family's official detection code takes sizes that are not multiples of res_multiple:
    # "" (it does not: refused), or how it pads (then ``export --features`` pads the same way).
    features_pad: str = ""
    # Checkpoint handling: map a foreign layout (e.g. timm's) to ours; infer builder kwargs
    # (distillation head, number of classes) from a state dict in our layout.
    convert_state_dict: Callable[[dict], dict] | None = field(default=None, repr=False)
    infer_kwargs: Callable[[dict], dict] | None = field(default=None, repr=False)
    weights_note: str = ""
    # Why our parameter count and the paper's printed figure disagree (see params_agree); empty
    # where they agree. Shown by 'info' and flagged by 'list'.
    params_note: str = ""

    def __post_init__(self):
        if not 0 < self.crop_pct <= 1 or self.interpolation not in INTERPOLATIONS:
            raise RuntimeError(f"model {self.name}: crop_pct {self.crop_pct} / interpolation "
                               f"{self.interpolation!r} is not an eval transform this tool runs")

    def params_agree(self, params: int) -> bool:
        """Whether a parameter count agrees with the paper's printed figure: within 1%, or equal
        to it once rounded to the digits the paper prints (a count of 2.349M agrees with a printed "2.3M")."""
        if self.paper_params_m is None:
            return True
        p = params / 1e6
        text = repr(self.paper_params_m)
        digits = len(text.split(".")[1]) if isinstance(self.paper_params_m, float) and "." in text else 0
        return abs(p - self.paper_params_m) <= 0.01 * self.paper_params_m or round(p, digits) == self.paper_params_m

    def check_resolution(self, res: tuple[int, int], features: bool = False) -> None:
        """Refuse a size the model cannot take, naming the nearest ones it can. A backbone export
        (``features``) of a family whose detection code pads takes any size from ``min_res`` up."""
        h, w = res
        if h <= 0 or w <= 0:
            raise ResolutionError(f"resolution must be positive, got {h}x{w}")
        if features and self.features_pad and h >= self.min_res and w >= self.min_res:
            return
        if h < self.min_res or w < self.min_res or h % self.res_multiple or w % self.res_multiple:
            near = sorted({self.nearest(h, w, up) for up in (False, True)})
            raise ResolutionError(
                f"{self.name} cannot take {h}x{w}: height and width must be multiples of "
                f"{self.res_multiple} and at least {self.min_res}; nearest: "
                f"{' or '.join(f'{a}x{b}' if a != b else str(a) for a, b in near)}")

    def nearest(self, h: int, w: int, up: bool) -> tuple[int, int]:
        """The nearest size this model takes, rounding each side down (or up)."""
        m = self.res_multiple
        side = lambda v: max(self.min_res, -(-v // m) * m if up else v // m * m)  # noqa: E731
        return side(h), side(w)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(**meta) -> Callable:
    """Decorator: ``@register_model(family=..., paper=..., default_res=..., ...)`` on a builder
    function whose name is the model name and which takes ``num_classes`` and keyword options."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = meta.pop("name", fn.__name__)
        if name in _REGISTRY:
            raise RuntimeError(f"model {name} registered twice")
        _REGISTRY[name] = ModelInfo(name=name, builder=fn, **meta)
        return fn

    return wrap


def _ensure_loaded() -> None:
    from . import models  # noqa: F401  (imports every family file, which registers its models)


def list_models(family: str | None = None) -> list[str]:
    _ensure_loaded()
    return [n for n, i in _REGISTRY.items() if family is None or i.family == family]


def canonical_name(name: str) -> str:
    """The zoo's name for what a user typed: any case, dashes for underscores (``SHViT-S4``), and a
    timm pretrained tag after the dot (``fastvit_t8.apple_in1k`` → ``fastvit_t8``; the weights
    themselves still come with ``--weights``)."""
    _ensure_loaded()
    if name in _REGISTRY:
        return name
    key = str(name).strip().lower().replace("-", "_")
    for k in (key, key.split(".")[0]):
        if k in _REGISTRY:
            return k
    raise UnknownModelError(name, list(_REGISTRY))


def get_model_info(name: str) -> ModelInfo:
    return _REGISTRY[canonical_name(name)]


def parse_resolution(res: int | str | tuple[int, int] | None, info: ModelInfo,
                     features: bool = False) -> tuple[int, int]:
    """``1024`` / ``"1024"`` / ``"768x1024"`` (height x width) / ``(h, w)`` → (h, w), checked."""
    if res is None:
        res = info.default_res
    if isinstance(res, str):
        try:
            parts = [int(p) for p in res.lower().split("x")]
        except ValueError:
            raise ResolutionError(f"resolution '{res}' is not a number; use e.g. 1024 or 768x1024") from None
        if len(parts) not in (1, 2):
            raise ResolutionError(f"resolution '{res}': use N or HxW, e.g. 1024 or 768x1024")
        res = (parts[0], parts[-1])
    if isinstance(res, int):
        res = (res, res)
    hw = (int(res[0]), int(res[1]))
    info.check_resolution(hw, features)
    return hw


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    distilled: bool | None = None,
    seed: int = 0,
    **kwargs,
) -> nn.Module:
    """Build a model by name, in eval mode.

    Without ``weights`` the model is randomly initialised with a fixed ``seed`` (reproducible).
    With ``weights`` the checkpoint is read safely, mapped from timm's layout when needed, and
    loaded strictly; options the checkpoint implies (a distillation head, the number of classes)
    are taken from it unless given explicitly.
    """
    info = get_model_info(name)
    sd = None
    if weights is not None:
        sd = _weights.to_our_layout(_weights.read_checkpoint(weights), info)
        if info.infer_kwargs is not None:
            for k, v in info.infer_kwargs(sd).items():
                kwargs.setdefault(k, v)
    if distilled is not None:
        kwargs["distillation"] = distilled
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    torch.manual_seed(seed)
    model = info.builder(**kwargs)
    if sd is not None:
        _weights.load_into(model, sd, name, str(weights))
    return model.eval()
