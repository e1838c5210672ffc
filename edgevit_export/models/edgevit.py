"""EdgeViT (Pan et al., ECCV 2022): light-weight ViTs built from Local-Global-Local (LGL) blocks.

Each of the four stages starts with a patch embedding (strided conv + LayerNorm; stride 4, then
2, 2, 2) and stacks LGL bottlenecks. An LGL block is

* **local aggregation** (``LocalAgg``, only in stages whose sub-sampling ratio r > 1): a
  conditional position encoding (3×3 depthwise conv, residual), then BatchNorm → 1×1 conv →
  5×5 depthwise conv → 1×1 conv (residual), then BatchNorm → conv-MLP (residual);
* **global sparse attention** (``SelfAttn``): the conditional position encoding again, then
  LayerNorm → ``GlobalSparseAttn`` (residual) and LayerNorm → MLP (residual). The attention
  picks one token in every r×r window ("delegates", strided sub-sampling, done in the official
  code as ``AvgPool2d(kernel_size=1, stride=r)``), runs multi-head self-attention among them,
  spreads the result back to full resolution with a depthwise ``ConvTranspose2d`` (kernel r,
  stride r: "local propagation"), applies LayerNorm and the output projection. With r = 1 it is
  plain multi-head self-attention (no propagation, no extra norm).

The head is BatchNorm2d → global average pool → Linear.

Layout: module and parameter names follow the official code (saic-fi/edgevit, ``src/edgevit.py``)
exactly, including registration order, so a state dict saved from the official ``EdgeVit`` loads
with ``strict=True``: ``patch_embed{1..4}.{norm,proj}``, ``blocks{1..4}.i.LocalAgg.{pos_embed,
norm1,conv1,attn,conv2,norm2,mlp.fc1,mlp.fc2}``, ``blocks{1..4}.i.SelfAttn.{pos_embed,norm1,
attn.qkv,attn.proj,attn.LocalProp,attn.norm,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``. Norm
epsilons as in the official code: 1e-6 for the LayerNorms inside ``SelfAttn``, PyTorch's default
1e-5 for the patch-embedding and local-propagation LayerNorms. No weights were released.
Dropped from the official class: the fixed ``img_size`` assertion of its patch embedding (any
size below is taken) and the unused ``representation_size`` pre-logits (it cannot be built there).

Resolutions: height and width (independently) must be multiples of 32, at least 32. The total
stride is 32; stage 1 (stride 4) sub-samples by 4 and stage 3 (stride 16) by 2, so the stage-3 map
needs an even side, i.e. the input a multiple of 32. Otherwise the official forward breaks: the
sub-sampler gives ceil(h/r) rows while the code reshapes to int(h/r) and the transposed conv gives
back (h//r)·r ≠ h. Sizes 32k+1 … 32k+3 would run, but only because the stride-4 patch embedding
silently drops the last 1–3 pixel rows/columns, so they are refused too.

Params and MACs are measured, never typed in here: ``edgevit-export list`` / ``info`` count the
params and take MACs from :func:`edgevit_export.measure.count_macs`, beside the paper's table
(``paper_params_m`` / ``paper_macs_m``; the paper's GFLOPs are GMACs printed with one decimal).
``tests/test_edgevit.py`` checks how they relate: params of XXS and S agree with the paper within
1%; XS lies just over 1% above its printed 6.7M because the paper truncates that count instead of
rounding it (its ``params_note``). Measured MACs round to the paper's one-decimal figures, so
XXS's "0.6 G" stands for a count well below 600 M. The official ``check_model.py`` counts with
fvcore, which also charges 5 per LayerNorm element and 2 per eval-BatchNorm element (a few MMACs
more, still the same one-decimal figures); ``count_macs`` counts only convolutions (transposed
ones as fvcore does: input positions × kernel size × channels), linear layers and the attention
matmuls.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..features import Feature
from ..registry import register_model

# Per-variant configuration (official builders edgevit_xxs / edgevit_xs / edgevit_s).
CONFIGS = {
    "edgevit_xxs": dict(depth=(1, 1, 3, 2), embed_dim=(36, 72, 144, 288), head_dim=36),
    "edgevit_xs": dict(depth=(1, 1, 3, 1), embed_dim=(48, 96, 240, 384), head_dim=48),
    "edgevit_s": dict(depth=(1, 2, 5, 3), embed_dim=(48, 96, 240, 384), head_dim=48),
}
MLP_RATIO = 4.0
SR_RATIOS = (4, 2, 2, 1)  # sub-sampling ratio r of the global sparse attention, per stage
PATCH_SIZES = (4, 2, 2, 2)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (identity at inference)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """Two-layer MLP with GELU: ``fc1`` → GELU → ``fc2``; 1×1 convs on NCHW maps when ``conv``
    (the official ``CMlp`` of local aggregation), linear layers on tokens otherwise."""

    def __init__(self, dim: int, hidden: int, conv: bool = False, drop: float = 0.0):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.fc1 = layer(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = layer(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class GlobalSparseAttn(nn.Module):
    """Global sparse attention: sub-sample one delegate token per r×r window, multi-head
    self-attention among the delegates, local propagation back to full resolution by a depthwise
    transposed conv (kernel = stride = r) followed by LayerNorm, then the output projection."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr = sr_ratio
        if sr_ratio > 1:
            self.sampler = nn.AvgPool2d(1, sr_ratio)  # kernel 1: picks every r-th pixel
            self.LocalProp = nn.ConvTranspose2d(dim, dim, sr_ratio, stride=sr_ratio, groups=dim)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sampler = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        h, w = H, W
        if self.sr > 1:
            x = self.sampler(x.transpose(1, 2).reshape(B, C, H, W))
            h, w = H // self.sr, W // self.sr
            x = x.flatten(2).transpose(1, 2)
        qkv = self.qkv(x).reshape(B, h * w, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, h * w, C)
        if self.sr > 1:
            x = self.LocalProp(x.transpose(1, 2).reshape(B, C, h, w))
            x = self.norm(x.flatten(2).transpose(1, 2))
        return self.proj_drop(self.proj(x))


class LocalAgg(nn.Module):
    """Local aggregation: conditional position encoding (3×3 depthwise), then
    BN → 1×1 → 5×5 depthwise → 1×1 (residual), then BN → conv-MLP (residual). NCHW in and out."""

    def __init__(self, dim: int, mlp_ratio: float = MLP_RATIO, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), conv=True, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SelfAttn(nn.Module):
    """Global part of the LGL block: conditional position encoding (3×3 depthwise, residual),
    LayerNorm → global sparse attention (residual), LayerNorm → MLP (residual). NCHW in and out."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float = MLP_RATIO,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GlobalSparseAttn(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(B, C, H, W)


class LGLBlock(nn.Module):
    """Local-Global-Local bottleneck: local aggregation (only where sr_ratio > 1), then global
    sparse attention with local propagation."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float = MLP_RATIO,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.LocalAgg = LocalAgg(dim, mlp_ratio, drop, drop_path) if sr_ratio > 1 else nn.Identity()
        self.SelfAttn = SelfAttn(dim, num_heads, sr_ratio, mlp_ratio, qkv_bias=True, drop=drop,
                                attn_drop=attn_drop, drop_path=drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SelfAttn(self.LocalAgg(x))


class PatchEmbed(nn.Module):
    """Patch embedding / downsampling: conv with kernel = stride = patch size, then LayerNorm over
    channels. NCHW in and out."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        B, C, H, W = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(B, C, H, W)


class EdgeViT(nn.Module):
    """EdgeViT: four stages of patch embedding + LGL blocks, BatchNorm2d, average pool, Linear."""

    def __init__(self, depth=(1, 2, 5, 3), embed_dim=(48, 96, 240, 384), head_dim: int = 48,
                 num_classes: int = 1000, in_chans: int = 3, mlp_ratio: float = MLP_RATIO,
                 sr_ratios=SR_RATIOS, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        chans = (in_chans,) + tuple(embed_dim)
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(PATCH_SIZES[i], chans[i], chans[i + 1]))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depth)).tolist()
        start = 0
        for i in range(4):
            blocks = nn.ModuleList(
                LGLBlock(embed_dim[i], embed_dim[i] // head_dim, sr_ratios[i], mlp_ratio,
                         drop_rate, attn_drop_rate, dpr[start + j])
                for j in range(depth[i])
            )
            setattr(self, f"blocks{i + 1}", blocks)
            start += depth[i]
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        # Per-stage feature maps: the output of each stage's last LGL block.
        self.stage_names = [f"blocks{i + 1}.{depth[i] - 1}" for i in range(4)]
        # No official dense-prediction code exists; the stage outputs (strides 4–32), without the
        # classifier's final BatchNorm, as third-party detection wrappers take them.
        self.feature_info = [Feature(4 * 2 ** i, embed_dim[i], self.stage_names[i]) for i in range(4)]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image → the stage-4 map after the final BatchNorm, (B, C, H/32, W/32)."""
        x = self.pos_drop(self.patch_embed1(x))
        for i, blocks in enumerate((self.blocks1, self.blocks2, self.blocks3, self.blocks4)):
            if i:
                x = getattr(self, f"patch_embed{i + 1}")(x)
            for blk in blocks:
                x = blk(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices) -> list[torch.Tensor]:
        """Image → the stage outputs at ``indices`` of ``feature_info`` (strides 4, 8, 16, 32)."""
        x, outs = self.pos_drop(x), []
        for i in range(max(indices) + 1):
            x = getattr(self, f"patch_embed{i + 1}")(x)
            for blk in getattr(self, f"blocks{i + 1}"):
                x = blk(x)
            if i in indices:
                outs.append(x)
        return outs

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Map → logits: global average pool, Linear."""
        return self.head(x.flatten(2).mean(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _infer_kwargs(sd: dict) -> dict:
    """Number of classes from the head (0 where the checkpoint has none)."""
    w = sd.get("head.weight")
    return {"num_classes": int(w.shape[0]) if w is not None else 0}


_COMMON = dict(
    family="EdgeViT",
    paper="EdgeViTs (Pan et al., ECCV 2022)",
    default_res=224,
    res_multiple=32,
    min_res=32,
    infer_kwargs=_infer_kwargs,
    weights_note="No official weights were released; checkpoints trained with the official code "
    "(saic-fi/edgevit) load as they are.",
    # saic-fi/edgevit src/datasets.py build_transform (eval, DeiT's): Resize(int(256 / 224 * input_size),
    # interpolation=3 = bicubic), CenterCrop(input_size), IMAGENET_DEFAULT_MEAN/STD → 0.875 bicubic.
    crop_pct=0.875,
    interpolation="bicubic",
    preprocess_source="official eval transform (saic-fi/edgevit src/datasets.py: resize 256/224 bicubic, "
    "center crop, ImageNet mean/std)",
)


def _build(name: str, num_classes: int, **kwargs) -> EdgeViT:
    return EdgeViT(num_classes=num_classes, **CONFIGS[name], **kwargs)


@register_model(**_COMMON, paper_params_m=4.1, paper_macs_m=600, paper_top1=74.4)
def edgevit_xxs(num_classes: int = 1000, **kwargs) -> EdgeViT:
    return _build("edgevit_xxs", num_classes, **kwargs)


@register_model(**_COMMON, paper_params_m=6.7, paper_macs_m=1100, paper_top1=77.5,
                params_note="the official code's model (a state dict saved from it loads strictly); "
                "the paper prints this count truncated, not rounded, to one decimal.")
def edgevit_xs(num_classes: int = 1000, **kwargs) -> EdgeViT:
    return _build("edgevit_xs", num_classes, **kwargs)


@register_model(**_COMMON, paper_params_m=13.1, paper_macs_m=1900, paper_top1=81.0)
def edgevit_s(num_classes: int = 1000, **kwargs) -> EdgeViT:
    return _build("edgevit_s", num_classes, **kwargs)
