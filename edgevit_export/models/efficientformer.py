"""EfficientFormer (Li et al., NeurIPS 2022) and EfficientFormerV2 (Li et al., ICCV 2023) in timm's
parameter layout (``timm/models/efficientformer.py``, ``efficientformer_v2.py``), so that timm's
``efficientformer_l1.snap_dist_in1k`` / ``efficientformerv2_s1.snap_dist_in1k`` state dicts load
with strict key matching.

EfficientFormer-L1 (V1): a two-conv stride-4 stem (ReLU), then 4 stages (widths 48/96/224/448,
depths 3/2/6/4) of PoolFormer-style 4-D MetaBlocks (``avgpool3×3(x) − x`` token mixer, 1×1-conv FFN
with BN, layer scale), stride-2 conv+BN downsampling between stages; the last block of stage 4 is a
3-D MetaBlock (tokens, LayerNorm, 8-head attention with key_dim 32, value dim 4·32 and a learned
per-head relative position bias over |Δy|, |Δx|), preceded by a flatten. Head: LayerNorm, token
mean, two linear heads ``head`` and ``head_dist`` (distillation), averaged at inference.

EfficientFormerV2-S1: conv stem (two 3×3 stride-2 conv+BN+GELU), stages of widths 32/48/120/224
and depths 3/3/9/6 with FFN blocks (1×1 conv+BN+GELU, 3×3 depthwise conv+BN+GELU, 1×1 conv+BN;
per-block expansion ratios) and layer scale; the last two blocks of stages 3 and 4 add MHSA on the
4-D map (q/k/v as 1×1 conv+BN, a depthwise "local value" branch, talking-head 1×1 convs around the
softmax, per-head position bias). Stage 3 attention runs on a stride-2 copy of the map (depthwise
conv+BN down, bilinear ×2 up). Stage 4 is entered through an attention downsampler whose queries
come from a strided depthwise conv plus 2× subsampling. Head: BatchNorm, global mean, ``head`` and
``head_dist`` averaged.

Position bias at other resolutions. Both versions store one bias per head and per offset
(|Δy|, |Δx|) on the token grid of the training resolution (224: V1's 7×7 in stage 4; V2's 7×7
and, for the stage-4 downsampler, 14×14 — timm builds V2's tables from ``img_size``, so does
``efficientformerv2_s1(img_size=...)``). timm's V1 only runs at 224 (fixed resolution 7), V2 only
at the ``img_size`` it was built for. Here, at the training grid the bias is gathered exactly as in
timm; on any other grid the per-head (|Δy|, |Δx|) table is resampled to the new grid with bicubic
interpolation (PyTorch's kernel a = −0.75, align_corners=False, no antialias) and then gathered
with the new grid's offsets. This is the LeViT/TinyViT/timm convention for moving such tables to a
new resolution (``resize_rel_pos_bias_table_levit``); the resampling is done with two small
constant matrices, so the exported graph holds only matmuls and a gather on constants, which the
converters fold. (EfficientFormerV2's own detection/segmentation backbones instead bicubically resize the
expanded N×N bias matrix over flattened token indices; we do not follow them because that blends
biases across image rows.) Accuracy away from 224 without fine-tuning is not claimed by either paper.

Figures at 224×224. Params and MACs (``torch.utils.flop_counter``) are measured by
``edgevit-export list`` / ``info``, beside the papers'; ``tests/test_efficientformer.py`` checks how
they relate. Parameters match timm's counts (both heads included: the distillation head is
C·1000 + 1000 parameters). The papers' figures are consistent with counting the deployed model,
whose BatchNorms fold into the preceding convs (which already carry biases): that count agrees
with both papers' figures within 1%, while V2-S1 counted with its BatchNorms does not. MACs count
convs, linears and attention matmuls (not BN, activations, pooling, softmax or the bias gather)
and agree with the papers' within 1%. Top-1 is the papers' (distilled training, as timm's weights).

Core ML: both convert at 224, 512 and 1024. The position bias of every attention is folded into
a constant of shape (heads, Nq, Nk), so the .mlpackage grows with resolution, by the square of the
token count (at 1024, V2-S1's stage-4 downsampler alone holds an 8×1024×4096 bias); at run time
that attention map takes as much memory again.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn as nn

from ..features import Feature, stage_outputs, tokens_to_map
from ..registry import register_model

PAPER_V1 = "EfficientFormer (Li et al., NeurIPS 2022)"
PAPER_V2 = "EfficientFormerV2 (Li et al., ICCV 2023)"

V1_CONFIGS = {
    "efficientformer_l1": dict(depths=(3, 2, 6, 4), embed_dims=(48, 96, 224, 448), num_vit=1),
}
V2_CONFIGS = {
    "efficientformerv2_s1": dict(
        depths=(3, 3, 9, 6), embed_dims=(32, 48, 120, 224), num_vit=2,
        mlp_ratios=(4, 4, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)),
    ),
}


# ---------------------------------------------------------------- relative position bias


def _cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(src: int, dst: int) -> np.ndarray:
    """(src, dst) matrix M with ``t @ M`` = 1-D bicubic resize of the last axis of t from src to
    dst samples, identical to ``F.interpolate(mode='bicubic', align_corners=False)``."""
    m = np.zeros((src, dst), np.float64)
    for j in range(dst):
        s = (j + 0.5) * src / dst - 0.5
        i0 = math.floor(s)
        t = s - i0
        for o, w in zip((-1, 0, 1, 2), (_cubic(t + 1), _cubic(t), _cubic(1 - t), _cubic(2 - t))):
            m[min(max(i0 + o, 0), src - 1), j] += w
    return m.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _offset_index(kh: int, kw: int, q_stride: int = 1) -> np.ndarray:
    """(Nq, Nk) index into a (kh, kw) table of |Δy|, |Δx| offsets: keys on the kh×kw grid, queries
    on every ``q_stride``-th row and column of it (row-major, as timm's ``attention_bias_idxs``)."""
    qy, qx = np.meshgrid(np.arange(0, kh, q_stride), np.arange(0, kw, q_stride), indexing="ij")
    ky, kx = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    dy = np.abs(qy.reshape(-1, 1) - ky.reshape(1, -1))
    dx = np.abs(qx.reshape(-1, 1) - kx.reshape(1, -1))
    return (dy * kw + dx).astype(np.int64)


class PositionBias(nn.Module):
    """Mixin for attention with a learned per-head bias over (|Δy|, |Δx|) token offsets.

    Holds ``attention_biases`` (heads, R0·R1) for the training grid ``bias_res`` and the index
    buffer ``attention_bias_idxs``. :meth:`position_bias` returns the (heads, Nq, Nk) bias for a
    key grid ``k_hw``: timm's exact gather on the training grid, otherwise the table bicubically
    resampled to ``k_hw`` (see the module docstring)."""

    bias_res: tuple[int, int]
    q_stride: int = 1

    def _init_bias(self, num_heads: int, res: tuple[int, int], q_stride: int, persistent: bool) -> None:
        self.bias_res, self.q_stride = res, q_stride
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, res[0] * res[1]))
        idx = torch.from_numpy(_offset_index(res[0], res[1], q_stride).copy())
        self.register_buffer("attention_bias_idxs", idx, persistent=persistent)

    def position_bias(self, k_hw: tuple[int, int]) -> torch.Tensor:
        kh, kw = int(k_hw[0]), int(k_hw[1])
        if (kh, kw) == self.bias_res:
            return self.attention_biases[:, self.attention_bias_idxs]
        r0, r1 = self.bias_res
        table = self.attention_biases.reshape(-1, r0, r1)
        mh = torch.from_numpy(_bicubic_matrix(r0, kh)).to(table.dtype)
        mw = torch.from_numpy(_bicubic_matrix(r1, kw)).to(table.dtype)
        table = (mh.t() @ table @ mw).reshape(table.shape[0], kh * kw)
        return table[:, torch.from_numpy(_offset_index(kh, kw, self.q_stride))]


# ---------------------------------------------------------------- EfficientFormer (V1)


def _half(n: int) -> int:
    """Output side of a 3×3 stride-2 conv with padding 1 (rounds up)."""
    return (n - 1) // 2 + 1


class Attention(PositionBias):
    """V1 multi-head attention on tokens: one qkv linear split per head into q, k (key_dim) and
    v (attn_ratio·key_dim); softmax(q·kᵀ·scale + position bias)·v; linear projection."""

    def __init__(self, dim: int = 448, key_dim: int = 32, num_heads: int = 8, attn_ratio: int = 4,
                 resolution: int = 7):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.scale = key_dim ** -0.5
        self.val_dim = attn_ratio * key_dim
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = nn.Linear(dim, key_dim * num_heads * 2 + self.val_attn_dim)
        self.proj = nn.Linear(self.val_attn_dim, dim)
        self._init_bias(num_heads, (resolution, resolution), 1, persistent=True)  # timm keeps it

    def forward(self, x, hw: tuple[int, int]):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.position_bias(hw)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class Stem4(nn.Sequential):
    """Two 3×3 stride-2 conv+BN+ReLU (stride 4 in all)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, 3, 2, 1)
        self.norm1 = nn.BatchNorm2d(out_chs // 2)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs // 2, out_chs, 3, 2, 1)
        self.norm2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()


class Downsample(nn.Module):
    """Patch embedding between stages: 3×3 stride-2 conv + BN."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_chs)

    def forward(self, x):
        return self.norm(self.conv(x))


class Flat(nn.Module):
    """(B, C, H, W) → (B, H·W, C)."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class Pooling(nn.Module):
    """PoolFormer token mixer: avgpool3×3(x) − x (padding excluded from the average)."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)

    def forward(self, x):
        return self.pool(x) - x


class ConvMlpWithNorm(nn.Module):
    """FFN on the 4-D map: 1×1 conv, BN, GELU, 1×1 conv, BN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x):
        return self.norm2(self.fc2(self.act(self.norm1(self.fc1(x)))))


class Mlp(nn.Module):
    """FFN on tokens: linear, GELU, linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale γ (C,) on the last axis (tokens)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class LayerScale2d(LayerScale):
    """Per-channel scale γ (C,) on the channel axis of a (B, C, H, W) map."""

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class MetaBlock2d(nn.Module):
    """4-D MetaBlock: x + γ₁·pool-mixer(x); x + γ₂·FFN(x)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.token_mixer = Pooling(3)
        self.ls1 = LayerScale2d(dim)
        self.mlp = ConvMlpWithNorm(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale2d(dim)

    def forward(self, x):
        x = x + self.ls1(self.token_mixer(x))
        return x + self.ls2(self.mlp(x))


class MetaBlock1d(nn.Module):
    """3-D MetaBlock (transformer block): x + γ₁·Attn(LN(x)); x + γ₂·MLP(LN(x))."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x, hw: tuple[int, int]):
        x = x + self.ls1(self.token_mixer(self.norm1(x), hw))
        return x + self.ls2(self.mlp(self.norm2(x)))


class EfficientFormerStage(nn.Module):
    """Downsample, then 4-D blocks; with ``num_vit`` > 0 a flatten and that many 3-D blocks end it
    (timm's ``blocks`` indices: the flatten takes one slot)."""

    def __init__(self, dim: int, dim_out: int, depth: int, downsample: bool, num_vit: int = 0,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.downsample = Downsample(dim, dim_out) if downsample else nn.Identity()
        blocks: list[nn.Module] = [Flat()] if num_vit >= depth else []
        for i in range(depth):
            remain = depth - i - 1
            if num_vit > remain:
                blocks.append(MetaBlock1d(dim_out, mlp_ratio))
            else:
                blocks.append(MetaBlock2d(dim_out, mlp_ratio))
                if num_vit and num_vit == remain:
                    blocks.append(Flat())
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        x = self.downsample(x)
        hw = (x.shape[2], x.shape[3])
        for blk in self.blocks:
            if isinstance(blk, Flat):
                hw = (x.shape[2], x.shape[3])
            x = blk(x, hw) if isinstance(blk, MetaBlock1d) else blk(x)
        return x


class EfficientFormer(nn.Module):
    def __init__(self, depths, embed_dims, num_vit: int, num_classes: int = 1000,
                 distillation: bool = True, mlp_ratio: float = 4.0):
        super().__init__()
        self.stem = Stem4(3, embed_dims[0])
        stages, prev = [], embed_dims[0]
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            stages.append(EfficientFormerStage(prev, dim, depth, downsample=i > 0,
                                               num_vit=num_vit if i == 3 else 0, mlp_ratio=mlp_ratio))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.num_classes = num_classes
        self.num_features = prev
        self.norm = nn.LayerNorm(prev)
        self.head = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()) if distillation else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.stage_names = [f"stages.{i}" for i in range(len(depths))]
        # timm's feature_info / features_only: the four stage outputs (strides 4–32), without the
        # classifier's final LayerNorm; stage 4's tokens go back to their map.
        self.feature_info = [Feature(4 * 2 ** i, d, f"stages.{i}") for i, d in enumerate(embed_dims)]

    def forward_intermediates(self, x, indices):
        """Image → the stage outputs at ``indices`` of ``feature_info`` (strides 4, 8, 16, 32)."""
        x, outs = self.stem(x), []
        for i, stage in enumerate(self.stages[:max(indices) + 1]):
            hw = (_half(x.shape[2]), _half(x.shape[3])) if i else (x.shape[2], x.shape[3])
            x = stage(x)
            if i in indices:
                outs.append(tokens_to_map(x, hw) if x.dim() == 3 else x)
        return outs

    def forward_features(self, x):
        """Image → the stage-4 map after the final LayerNorm, (B, C, H/32, W/32). Stage 4 ends in
        tokens (B, h·w, C); they go back to the map they were flattened from."""
        h, w = x.shape[2], x.shape[3]
        for _ in range(2 + len(self.stages) - 1):  # stem: two stride-2 convs; one per downsample
            h, w = _half(h), _half(w)
        x = self.norm(self.stages(self.stem(x)))
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

    def forward_head(self, x):
        """Map → logits: mean over the tokens; ``head`` and ``head_dist`` averaged."""
        x = x.flatten(2).transpose(1, 2).mean(dim=1)
        if self.head_dist is None:
            return self.head(x)
        return (self.head(x) + self.head_dist(x)) / 2

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- EfficientFormerV2


class ConvNorm(nn.Module):
    """Conv (with bias) + BN, optionally followed by GELU: timm's ``ConvNorm`` / ``ConvNormAct``."""

    def __init__(self, in_chs: int, out_chs: int, k: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, k, stride, k // 2, groups=groups, bias=True)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Attention2d(PositionBias):
    """V2 MHSA on a (B, C, H, W) map: q, k, v by 1×1 conv+BN, a 3×3 depthwise "local value"
    branch, talking-head 1×1 convs before and after the softmax, position bias; with ``stride``
    it attends on a depthwise-strided copy of the map and upsamples the result bilinearly."""

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: int = 4,
                 resolution: tuple[int, int] = (7, 7), stride: int | None = None):
        super().__init__()
        self.num_heads, self.scale = num_heads, key_dim ** -0.5
        if stride is not None:
            resolution = tuple(math.ceil(r / stride) for r in resolution)
            self.stride_conv = ConvNorm(dim, dim, 3, stride, groups=dim)
            self.upsample = nn.Upsample(scale_factor=stride, mode="bilinear")
        else:
            self.stride_conv = None
            self.upsample = None
        self.dh = attn_ratio * key_dim * num_heads
        kh = key_dim * num_heads
        self.q = ConvNorm(dim, kh)
        self.k = ConvNorm(dim, kh)
        self.v = ConvNorm(dim, self.dh)
        self.v_local = ConvNorm(self.dh, self.dh, 3, groups=self.dh)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.act = nn.GELU()
        self.proj = ConvNorm(self.dh, dim, 1)
        self._init_bias(num_heads, tuple(resolution), 1, persistent=False)

    def forward(self, x):
        B = x.shape[0]
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        h, w = x.shape[2], x.shape[3]
        N = h * w
        q = self.q(x).reshape(B, self.num_heads, -1, N).permute(0, 1, 3, 2)
        k = self.k(x).reshape(B, self.num_heads, -1, N)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(B, self.num_heads, -1, N).permute(0, 1, 3, 2)
        attn = (q @ k) * self.scale + self.position_bias((h, w))
        attn = self.talking_head2(self.talking_head1(attn).softmax(dim=-1))
        x = (attn @ v).transpose(2, 3).reshape(B, self.dh, h, w) + v_local
        if self.upsample is not None:
            x = self.upsample(x)
        return self.proj(self.act(x))


class LocalGlobalQuery(nn.Module):
    """Downsampled queries: 3×3 stride-2 depthwise conv + 2× subsampling (1×1 avg pool, stride 2),
    then 1×1 conv+BN."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.pool = nn.AvgPool2d(1, 2, 0)
        self.local = nn.Conv2d(in_dim, in_dim, 3, 2, 1, groups=in_dim)
        self.proj = ConvNorm(in_dim, out_dim, 1)

    def forward(self, x):
        return self.proj(self.local(x) + self.pool(x))


class Attention2dDownsample(PositionBias):
    """Attention downsampler (stride 2): queries from :class:`LocalGlobalQuery` on the half-size
    grid, keys/values on the full grid, local value branch by a 3×3 stride-2 depthwise conv+BN."""

    def __init__(self, dim: int, out_dim: int, key_dim: int = 16, num_heads: int = 8,
                 attn_ratio: int = 4, resolution: tuple[int, int] = (14, 14)):
        super().__init__()
        self.num_heads, self.scale = num_heads, key_dim ** -0.5
        self.dh = attn_ratio * key_dim * num_heads
        kh = key_dim * num_heads
        self.q = LocalGlobalQuery(dim, kh)
        self.k = ConvNorm(dim, kh, 1)
        self.v = ConvNorm(dim, self.dh, 1)
        self.v_local = ConvNorm(self.dh, self.dh, 3, 2, groups=self.dh)
        self.act = nn.GELU()
        self.proj = ConvNorm(self.dh, out_dim, 1)
        self._init_bias(num_heads, tuple(resolution), 2, persistent=False)

    def forward(self, x):
        B, _, H, W = x.shape
        q = self.q(x)
        h2, w2 = q.shape[2], q.shape[3]
        q = q.reshape(B, self.num_heads, -1, h2 * w2).permute(0, 1, 3, 2)
        k = self.k(x).reshape(B, self.num_heads, -1, H * W)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(B, self.num_heads, -1, H * W).permute(0, 1, 3, 2)
        attn = ((q @ k) * self.scale + self.position_bias((H, W))).softmax(dim=-1)
        x = (attn @ v).transpose(2, 3).reshape(B, self.dh, h2, w2) + v_local
        return self.proj(self.act(x))


class DownsampleV2(nn.Module):
    """3×3 stride-2 conv+BN, plus the attention downsampler where ``use_attn`` (stage 4)."""

    def __init__(self, in_chs: int, out_chs: int, resolution: tuple[int, int], use_attn: bool):
        super().__init__()
        self.conv = ConvNorm(in_chs, out_chs, 3, 2)
        self.attn = Attention2dDownsample(in_chs, out_chs, resolution=resolution) if use_attn else None

    def forward(self, x):
        out = self.conv(x)
        return out if self.attn is None else self.attn(x) + out


class ConvMlpV2(nn.Module):
    """V2 FFN: 1×1 conv+BN+GELU, 3×3 depthwise conv+BN+GELU, 1×1 conv+BN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = ConvNorm(dim, hidden, 1, act=True)
        self.mid = ConvNorm(hidden, hidden, 3, groups=hidden, act=True)
        self.fc2 = ConvNorm(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.mid(self.fc1(x)))


class EfficientFormerV2Block(nn.Module):
    """x + γ₁·MHSA(x) (where the block has attention); x + γ₂·FFN(x)."""

    def __init__(self, dim: int, mlp_ratio: float, resolution: tuple[int, int], stride: int | None,
                 use_attn: bool):
        super().__init__()
        self.token_mixer = Attention2d(dim, resolution=resolution, stride=stride) if use_attn else None
        self.ls1 = LayerScale2d(dim) if use_attn else None
        self.mlp = ConvMlpV2(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale2d(dim)

    def forward(self, x):
        if self.token_mixer is not None:
            x = x + self.ls1(self.token_mixer(x))
        return x + self.ls2(self.mlp(x))


class EfficientFormerV2Stage(nn.Module):
    def __init__(self, dim: int, dim_out: int, depth: int, resolution: tuple[int, int], downsample: bool,
                 block_stride: int | None, downsample_use_attn: bool, block_use_attn: bool, num_vit: int,
                 mlp_ratio):
        super().__init__()
        ratios = tuple(mlp_ratio) if isinstance(mlp_ratio, (tuple, list)) else (mlp_ratio,) * depth
        if downsample:
            self.downsample = DownsampleV2(dim, dim_out, resolution, downsample_use_attn)
            resolution = tuple(math.ceil(r / 2) for r in resolution)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*(
            EfficientFormerV2Block(dim_out, ratios[i], resolution, block_stride,
                                   use_attn=block_use_attn and i > depth - num_vit - 1)
            for i in range(depth)
        ))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class EfficientFormerV2(nn.Module):
    def __init__(self, depths, embed_dims, num_vit: int, mlp_ratios, num_classes: int = 1000,
                 distillation: bool = True, img_size: int = 224):
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv1", ConvNorm(3, embed_dims[0] // 2, 3, 2, act=True))
        self.stem.add_module("conv2", ConvNorm(embed_dims[0] // 2, embed_dims[0], 3, 2, act=True))
        stages, prev, stride = [], embed_dims[0], 4
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            res = (math.ceil(img_size / stride),) * 2
            stages.append(EfficientFormerV2Stage(
                prev, dim, depth, res, downsample=i > 0, block_stride=2 if i == 2 else None,
                downsample_use_attn=i >= 3, block_use_attn=i >= 2, num_vit=num_vit, mlp_ratio=mlp_ratios[i],
            ))
            stride *= 2 if i > 0 else 1
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.num_classes = num_classes
        self.num_features = prev
        self.norm = nn.BatchNorm2d(prev)
        self.head = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()) if distillation else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.stage_names = [f"stages.{i}" for i in range(len(depths))]
        # timm's feature_info and the official detection backbone (no norms): the four stage outputs.
        self.feature_info = [Feature(4 * 2 ** i, d, f"stages.{i}") for i, d in enumerate(embed_dims)]

    def forward_intermediates(self, x, indices):
        """Image → the stage outputs at ``indices`` of ``feature_info`` (strides 4, 8, 16, 32)."""
        return stage_outputs(self.stages, self.stem(x), indices)

    def forward_features(self, x):
        """Image → the stage-4 map after the final BatchNorm, (B, C, H/32, W/32)."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x):
        """Map → logits: global average pool; ``head`` and ``head_dist`` averaged."""
        x = x.mean(dim=(2, 3))
        if self.head_dist is None:
            return self.head(x)
        return (self.head(x) + self.head_dist(x)) / 2

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- checkpoints and registration


def convert_state_dict(sd: dict) -> dict:
    """Our layout is timm's: passed through unchanged."""
    return dict(sd)


def infer_kwargs_v1(sd: dict) -> dict:
    kw = {"distillation": "head_dist.weight" in sd}
    if "head.weight" in sd:
        kw["num_classes"] = int(sd["head.weight"].shape[0])
    return kw


def infer_kwargs_v2(sd: dict) -> dict:
    kw = infer_kwargs_v1(sd)
    # timm sizes V2's bias tables from img_size: the stage-4 downsampler's table is (img/16)².
    key = "stages.3.downsample.attn.attention_biases"
    if key in sd:
        kw["img_size"] = 16 * math.isqrt(int(sd[key].shape[1]))
    return kw


@register_model(
    family="EfficientFormer", paper=PAPER_V1, default_res=224, paper_params_m=12.3, paper_macs_m=1300,
    paper_top1=79.2, res_multiple=32, min_res=64, convert_state_dict=convert_state_dict,
    infer_kwargs=infer_kwargs_v1,
    weights_note="timm layout (efficientformer_l1.snap_dist_in1k: head + head_dist, averaged); "
                 "position bias trained on 7×7 tokens, bicubically resampled at other sizes.",
    # timm efficientformer.py _cfg (efficientformer_l1.snap_dist_in1k): 'crop_pct': .95,
    # 'interpolation': 'bicubic', IMAGENET_DEFAULT_MEAN/STD.
    crop_pct=0.95, interpolation="bicubic",
    preprocess_source="timm efficientformer_l1.snap_dist_in1k pretrained cfg (crop_pct 0.95, bicubic, "
                      "ImageNet mean/std)",
)
def efficientformer_l1(num_classes: int = 1000, distillation: bool = True) -> EfficientFormer:
    return EfficientFormer(**V1_CONFIGS["efficientformer_l1"], num_classes=num_classes, distillation=distillation)


@register_model(
    family="EfficientFormer", paper=PAPER_V2, default_res=224, paper_params_m=6.1, paper_macs_m=650,
    paper_top1=79.0, res_multiple=32, min_res=64, convert_state_dict=convert_state_dict,
    infer_kwargs=infer_kwargs_v2,
    params_note="timm's layout (both heads) counts BatchNorm separately; the paper counts the deployed "
                "model, BatchNorm folded into the convs, which rounds to its figure.",
    weights_note="timm layout (efficientformerv2_s1.snap_dist_in1k: head + head_dist, averaged); "
                 "position-bias tables sized for img_size (224), bicubically resampled at other sizes.",
    # timm efficientformer_v2.py _cfg (efficientformerv2_s1.snap_dist_in1k): 'crop_pct': .95,
    # 'interpolation': 'bicubic', IMAGENET_DEFAULT_MEAN/STD.
    crop_pct=0.95, interpolation="bicubic",
    preprocess_source="timm efficientformerv2_s1.snap_dist_in1k pretrained cfg (crop_pct 0.95, bicubic, "
                      "ImageNet mean/std)",
)
def efficientformerv2_s1(num_classes: int = 1000, distillation: bool = True, img_size: int = 224) -> EfficientFormerV2:
    return EfficientFormerV2(**V2_CONFIGS["efficientformerv2_s1"], num_classes=num_classes,
                             distillation=distillation, img_size=img_size)
