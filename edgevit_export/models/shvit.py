"""SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design (Yun & Ro, CVPR 2024).

Blocks, configs and parameter names follow the official code (ysj9909/SHViT), so its checkpoints
(``{'model': state_dict}``) load strictly; the same weights in timm's layout (``stages.N...``)
are mapped on load. Macro design: a 16×16 "patchify" stem of four stride-2 3×3 convs, three
stages at strides 16/32/64, single-head attention over a partial channel slice in stages 2–3.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import Feature
from ..registry import register_model

# Per variant: stage widths, depths, attention channel slice (partial_dim), block types.
CONFIGS = {
    "s1": dict(embed_dim=(128, 224, 320), depth=(2, 4, 5), partial_dim=(32, 48, 68)),
    "s2": dict(embed_dim=(128, 308, 448), depth=(2, 4, 5), partial_dim=(32, 66, 96)),
    "s3": dict(embed_dim=(192, 352, 448), depth=(3, 5, 5), partial_dim=(48, 75, 96)),
    "s4": dict(embed_dim=(224, 336, 448), depth=(4, 7, 6), partial_dim=(48, 72, 96)),
}
QK_DIM = 16
TYPES = ("i", "s", "s")  # 'i': conv + FFN only; 's': conv + single-head attention + FFN


def _divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (as the squeeze-excite reduction does)."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class Conv2d_BN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (``.c``, ``.bn``)."""

    def __init__(self, cin, cout, ks=1, stride=1, pad=0, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class BN_Linear(nn.Sequential):
    """BatchNorm1d followed by Linear (the classification head, ``.bn``, ``.l``)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(cin))
        self.add_module("l", nn.Linear(cin, cout))
        nn.init.trunc_normal_(self.l.weight, std=0.02)
        nn.init.zeros_(self.l.bias)


class Residual(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class FFN(nn.Module):
    """Pointwise expand (ratio 2) → ReLU → pointwise project."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.pw1 = Conv2d_BN(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x):
        return self.pw2(self.act(self.pw1(x)))


class SqueezeExcite(nn.Module):
    """Channel gate: mean over space → 1×1 conv (reduce) → ReLU → 1×1 conv (expand) → sigmoid."""

    def __init__(self, channels, ratio=0.25):
        super().__init__()
        rd = _divisible(channels * ratio)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class PatchMerging(nn.Module):
    """Stride-2 downsampling: 1×1 expand to 4C, 3×3 stride-2 depthwise, squeeze-excite, 1×1 out."""

    def __init__(self, dim, out_dim):
        super().__init__()
        hid = dim * 4
        self.conv1 = Conv2d_BN(dim, hid)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hid, hid, 3, 2, 1, groups=hid)
        self.se = SqueezeExcite(hid, 0.25)
        self.conv3 = Conv2d_BN(hid, out_dim)

    def forward(self, x):
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class SHSA(nn.Module):
    """Single-head self-attention on the first ``pdim`` channels; the rest pass through untouched.

    GroupNorm with one group (the paper says LayerNorm; the released weights need this), 1×1
    conv+BN to q, k (``qk_dim`` each) and v (``pdim``), softmax(qᵀk/√qk_dim), concat with the
    untouched channels, ReLU → 1×1 conv+BN over all channels.
    """

    def __init__(self, dim, qk_dim, pdim):
        super().__init__()
        self.dim, self.qk_dim, self.pdim = dim, qk_dim, pdim
        self.scale = qk_dim**-0.5
        self.pre_norm = nn.GroupNorm(1, pdim)
        self.qkv = Conv2d_BN(pdim, qk_dim * 2 + pdim)
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(dim, dim, bn_weight_init=0.0))

    def forward(self, x):
        b, _, h, w = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        q, k, v = torch.split(self.qkv(self.pre_norm(x1)), [self.qk_dim, self.qk_dim, self.pdim], dim=1)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        x1 = (v @ attn.transpose(-2, -1)).reshape(b, self.pdim, h, w)
        return self.proj(torch.cat([x1, x2], dim=1))


class BasicBlock(nn.Module):
    """Residual 3×3 depthwise conv, residual single-head attention (type 's'), residual FFN."""

    def __init__(self, dim, qk_dim, pdim, kind):
        super().__init__()
        self.conv = Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.mixer = Residual(SHSA(dim, qk_dim, pdim)) if kind == "s" else nn.Identity()
        self.ffn = Residual(FFN(dim, dim * 2))

    def forward(self, x):
        return self.ffn(self.mixer(self.conv(x)))


def _conv_ffn_pair(dim):
    return nn.Sequential(
        Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)),
        Residual(FFN(dim, dim * 2)),
    )


class SHViT(nn.Module):
    def __init__(self, embed_dim, depth, partial_dim, qk_dim=QK_DIM, types=TYPES,
                 num_classes=1000, distillation=False, in_chans=3):
        super().__init__()
        c0 = embed_dim[0]
        self.patch_embed = nn.Sequential(
            Conv2d_BN(in_chans, c0 // 8, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(c0 // 8, c0 // 4, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(c0 // 4, c0 // 2, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(c0 // 2, c0, 3, 2, 1),
        )
        stages: list[list[nn.Module]] = [[], [], []]
        for i, (dim, n, pdim, kind) in enumerate(zip(embed_dim, depth, partial_dim, types)):
            if i > 0:  # downsampling between stages: pair, PatchMerging, pair
                stages[i] += [_conv_ffn_pair(embed_dim[i - 1]),
                              PatchMerging(embed_dim[i - 1], dim),
                              _conv_ffn_pair(dim)]
            stages[i] += [BasicBlock(dim, qk_dim, pdim, kind) for _ in range(n)]
        self.blocks1 = nn.Sequential(*stages[0])
        self.blocks2 = nn.Sequential(*stages[1])
        self.blocks3 = nn.Sequential(*stages[2])
        # As the official code: no classifier (the pooled features come out) for num_classes=0.
        self.head = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.distillation = distillation
        if distillation:
            self.head_dist = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes
        self.stage_names = ["patch_embed", "blocks1", "blocks2", "blocks3"]
        # The detection backbone (official downstream/mmdet, and timm's feature_info): the three stage
        # outputs, no extra norm.
        self.feature_info = [Feature(16 * 2 ** i, dim, f"blocks{i + 1}") for i, dim in enumerate(embed_dim)]

    def forward_features(self, x):
        """Image → the stage-3 map (B, C, H/64, W/64)."""
        return self.blocks3(self.blocks2(self.blocks1(self.patch_embed(x))))

    def forward_intermediates(self, x, indices):
        """Image → the stage outputs at ``indices`` of ``feature_info`` (strides 16, 32, 64)."""
        x, outs = self.patch_embed(x), []
        for i, stage in enumerate((self.blocks1, self.blocks2, self.blocks3)[:max(indices) + 1]):
            x = stage(x)
            if i in indices:
                outs.append(x)
        return outs

    def forward_head(self, x):
        """Map → logits: global average pool, BN → Linear (the distilled head averaged in)."""
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.distillation:
            a, b = self.head(x), self.head_dist(x)
            return (a + b) / 2 if not self.training else (a, b)
        return self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# --- checkpoints -------------------------------------------------------------------------------

def from_timm_layout(sd: dict) -> dict:
    """timm's ``stages.N.{downsample.k, blocks.j}`` → the official ``blocksN+1.*`` layout.

    Also reshapes squeeze-excite fc weights stored as 2-D matrices (older official checkpoints)
    to 1×1 conv kernels, as the official loader does. Our own layout passes through unchanged.
    """
    out = {}
    ds = {"0": "0.0", "1": "0.1", "2": "1", "3": "2.0", "4": "2.1"}
    for k, v in sd.items():
        m = re.match(r"stages\.(\d)\.(downsample|blocks)\.(\d+)\.(.*)", k)
        if m:
            s, part, idx, rest = int(m[1]), m[2], m[3], m[4]
            if part == "downsample":
                k = f"blocks{s + 1}.{ds[idx]}.{rest}"
            else:
                k = f"blocks{s + 1}.{int(idx) + (3 if s > 0 else 0)}.{rest}"
        if re.search(r"\.se\.fc[12]\.weight$", k) and v.ndim == 2:
            v = v[:, :, None, None]
        out[k] = v
    return out


def to_timm_layout(sd: dict) -> dict:
    """Ours (official) → timm's layout; the inverse of :func:`from_timm_layout` (used in tests
    and by users who want to hand our weights to timm)."""
    out = {}
    inv = {"0.0": "0", "0.1": "1", "1": "2", "2.0": "3", "2.1": "4"}
    for k, v in sd.items():
        m = re.match(r"blocks(\d)\.(\d+)(\.\d+)?\.(.*)", k)
        if m:
            s, idx, sub, rest = int(m[1]) - 1, int(m[2]), m[3], m[4]
            if s > 0 and idx < 3:
                key = f"{idx}{sub or ''}"
                if key not in inv:  # idx 1 is PatchMerging, which has no sub-index
                    key, rest = str(idx), f"{sub[1:]}.{rest}" if sub else rest
                k = f"stages.{s}.downsample.{inv[key]}.{rest}"
            else:
                j = idx - (3 if s > 0 else 0)
                k = f"stages.{s}.blocks.{j}{sub or ''}.{rest}"
        out[k] = v
    return out


def _infer(sd: dict) -> dict:
    kw = {"distillation": any(k.startswith("head_dist.") for k in sd)}
    w = sd.get("head.l.weight")
    kw["num_classes"] = int(w.shape[0]) if w is not None else 0  # no head: a headless backbone
    return kw


def _register(variant, default_res, params, macs, top1):
    cfg = CONFIGS[variant]

    def builder(num_classes: int = 1000, distillation: bool = False, **kw) -> SHViT:
        return SHViT(**cfg, num_classes=num_classes, distillation=distillation, **kw)

    builder.__name__ = f"shvit_{variant}"
    register_model(
        family="SHViT", paper="SHViT (Yun & Ro, CVPR 2024)", default_res=default_res,
        paper_params_m=params, paper_macs_m=macs, paper_top1=top1,
        res_multiple=16, min_res=64,
        convert_state_dict=from_timm_layout, infer_kwargs=_infer,
        weights_note="official {'model': sd} or timm layout; distilled head_dist detected",
        # ysj9909/SHViT data/datasets.py build_transform (eval): Resize(int(256 / 224 * input_size),
        # interpolation=3 = bicubic), CenterCrop(input_size), IMAGENET_DEFAULT_MEAN/STD → 0.875 bicubic.
        crop_pct=0.875, interpolation="bicubic",
        preprocess_source="official eval transform (ysj9909/SHViT data/datasets.py: resize 256/224 bicubic, "
                          "center crop, ImageNet mean/std)",
    )(builder)


_register("s1", 224, 6.3, 241, 72.8)
_register("s2", 224, 11.4, 366, 75.2)
_register("s3", 224, 14.2, 601, 77.4)
_register("s4", 256, 16.5, 986, 79.4)
