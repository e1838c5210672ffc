"""EfficientViT-M0…M5 (Liu et al., CVPR 2023): memory-efficient ViT with cascaded group attention.

Microsoft's EfficientViT (not MIT's of the same name), built in timm's ``efficientvit_msra.py``
layout, where users' weights come from: ``patch_embed.conv{1..4}.{conv,bn}``,
``stages.<i>.downsample.{res1,patchmerge,res2}``, ``stages.<i>.blocks.<j>.{dw0,ffn0,mixer,dw1,ffn1}``
(residual wrappers hold their module as ``.m``), ``mixer.m.attn.{qkvs,dws,proj}.<h>`` plus
``attention_biases``, and ``head.{bn,linear}``. As in current timm, ``attention_bias_idxs`` is a
non-persistent buffer (not in the state dict); checkpoints saved by older timm versions carry it
and ``convert_state_dict`` drops it.

Paper terms:

- Overlapping patch embedding: four 3×3 stride-2 conv+BN (3 → C/8 → C/4 → C/2 → C), ReLU between.
- EfficientViT block ("sandwich" layout): residual depthwise 3×3 conv (token interaction) → residual
  FFN (1×1 conv ×2, ratio 2, ReLU) → residual cascaded group attention → residual dw conv → FFN.
- Cascaded group attention (CGA): the channels are split into one chunk per head; head h sees its
  chunk plus the previous head's output (the cascade), projects it with a 1×1 conv+BN to q, k
  (key_dim 16 each) and v (dim / heads), refines q with a depthwise k×k conv (kernel per head), and
  adds a learned bias indexed by the relative offset (|dy|, |dx|) of the two tokens. Outputs are
  concatenated → ReLU → 1×1 conv+BN.
- Local window attention: the CGA runs inside non-overlapping windows; maps that do not divide
  are zero-padded at the bottom/right first (the padding takes part in attention, unmasked, as in
  timm and the official code) and cropped afterwards.
- Subsample between stages: residual dw conv + FFN, patch merging (1×1 conv to 4C, ReLU, 3×3
  stride-2 dw conv, ReLU, squeeze-excite with sigmoid gate, 1×1 conv to the next width), residual
  dw conv + FFN. Head: global average pool → BatchNorm1d → Linear.

Resolution. The bias table of each stage's attention covers a window of side
``min(7, stage map side at img_size)`` (timm's rule, img_size = the training resolution, 224 for
all released weights): at 224 the stage maps are 14, 7, 4, so the windows are 7, 7 and 4 and the
tables hold 49, 49 and 16 offsets per head. These shapes are fixed by the checkpoint, so at any
input size we keep each stage's window at the side its table was trained for: a stage map no larger
than its window (both sides) is attended to whole (the bias entries for the offsets it has are
picked from the table); a larger map is padded to a multiple of the window and partitioned. At 224
this is exactly timm's computation. Elsewhere (timm refuses other sizes for a model built at
224): at 512 the maps are 32, 16, 8 — stages 1–2 use 7×7 windows over maps padded to 35 and 21,
stage 3 four 4×4 windows of its 8×8 map (not one 7×7 window, for which the 224 checkpoint has no
offsets ≥ 4). Window partition and reverse use rank-5 tensors at most (the reference goes through
rank 6), and all pad/partition sizes are Python ints from the input shape, so a fixed-size export
is fully static. Inputs: any multiple of 16, at least 32 (odd stage maps are rounded up by the
stride-2 convs, as in the reference).

Params and MACs (torch.utils.flop_counter: convs, linear and the two attention matmuls per
head; BN, softmax, the bias add, activations, the SE gate and residual adds are not counted) are
measured by ``edgevit-export list`` / ``info``, beside the paper's figures;
``tests/test_efficientvit.py`` checks how they relate at 224. MACs agree with the paper's within 1%. The
params are timm's counts (BatchNorm weights and biases included). The paper's figures are
consistent with counting the inference model, every BN folded into the conv / linear before it,
rounded to 0.1M: all six match that way, whereas unfused M5 would not. M0 rounds to its printed
2.3M either way yet lies more than 1% above it: a rounding gap, not an architectural one.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import Feature, stage_outputs as _stage_outputs
from ..registry import register_model

# Per variant (timm / paper Table 1): stage widths, depths, heads, q dw-conv kernel per head.
CONFIGS = {
    "m0": dict(embed_dim=(64, 128, 192), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(5, 5, 5, 5)),
    "m1": dict(embed_dim=(128, 144, 192), depth=(1, 2, 3), num_heads=(2, 3, 3), kernels=(7, 5, 3, 3)),
    "m2": dict(embed_dim=(128, 192, 224), depth=(1, 2, 3), num_heads=(4, 3, 2), kernels=(7, 5, 3, 3)),
    "m3": dict(embed_dim=(128, 240, 320), depth=(1, 2, 3), num_heads=(4, 3, 4), kernels=(5, 5, 5, 5)),
    "m4": dict(embed_dim=(128, 256, 384), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(7, 5, 3, 3)),
    "m5": dict(embed_dim=(192, 288, 384), depth=(1, 3, 4), num_heads=(3, 3, 4), kernels=(7, 5, 3, 3)),
}
KEY_DIM = 16
WINDOW = 7
PATCH = 16


def _half(n: int) -> int:
    """Output side of a 3×3 stride-2 conv with padding 1 (rounds up)."""
    return (n - 1) // 2 + 1


def stage_resolutions(img_size: int) -> list[int]:
    """Stage map sides at ``img_size`` as timm computes them (they fix the bias-table sizes)."""
    r0 = img_size // PATCH
    return [r0, _half(r0), _half(_half(r0))]


def _divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class ConvNorm(nn.Sequential):
    """Convolution without bias → BatchNorm (``.conv``, ``.bn``)."""

    def __init__(self, cin, cout, ks=1, stride=1, pad=0, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class NormLinear(nn.Sequential):
    """Classifier head: BatchNorm1d → dropout → Linear."""

    def __init__(self, cin, cout, drop=0.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(cin, cout)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)


class Residual(nn.Module):
    """``x + m(x)`` (stochastic depth is a training-only detail and is left out)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class ConvMlp(nn.Module):
    """FFN: 1×1 conv+BN (ratio 2) → ReLU → 1×1 conv+BN."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = ConvNorm(hidden, dim)

    def forward(self, x):
        return self.pw2(self.act(self.pw1(x)))


class SqueezeExcite(nn.Module):
    """Squeeze-excite of patch merging: mean → 1×1 conv (C/4) → ReLU → 1×1 conv → sigmoid gate."""

    def __init__(self, channels, ratio=0.25):
        super().__init__()
        rd = _divisible(channels * ratio)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.bn = nn.Identity()
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * self.gate(s)


class PatchMerging(nn.Module):
    """Subsampling: 1×1 expand to 4C → ReLU → 3×3 s2 dw conv → ReLU → SE → 1×1 to the next width."""

    def __init__(self, dim, out_dim):
        super().__init__()
        hid = dim * 4
        self.conv1 = ConvNorm(dim, hid)
        self.act = nn.ReLU()
        self.conv2 = ConvNorm(hid, hid, 3, 2, 1, groups=hid)
        self.se = SqueezeExcite(hid)
        self.conv3 = ConvNorm(hid, out_dim)

    def forward(self, x):
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention over one window (or a whole map no larger than the window).

    ``resolution`` is the window side the bias table covers: entry ``|dy| * resolution + |dx|``
    holds the bias of a token pair at offset (dy, dx), one row per head.
    """

    def __init__(self, dim, key_dim, num_heads, attn_ratio, resolution, kernels):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.resolution = resolution
        self.qkvs = nn.ModuleList(
            ConvNorm(dim // num_heads, 2 * key_dim + self.val_dim) for _ in range(num_heads)
        )
        self.dws = nn.ModuleList(
            ConvNorm(key_dim, key_dim, kernels[h], 1, kernels[h] // 2, groups=key_dim) for h in range(num_heads)
        )
        self.proj = nn.Sequential(nn.ReLU(), ConvNorm(self.val_dim * num_heads, dim))
        # Offsets are numbered in order of first appearance over all point pairs, which for a
        # square window is row-major in (|dy|, |dx|): index = |dy| * resolution + |dx|.
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p in points:
            for q in points:
                off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        n = len(points)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(n, n), persistent=False)

    def attention_bias(self, h: int, w: int) -> torch.Tensor:
        """Bias (heads, h·w, h·w) for an h×w map, h, w ≤ resolution (static slicing)."""
        r = self.resolution
        idx = self.attention_bias_idxs
        if (h, w) != (r, r):
            idx = idx.view(r, r, r, r)[:h, :w, :h, :w].reshape(h * w, h * w)
        return self.attention_biases[:, idx]

    def forward(self, x):
        B, _, H, W = x.shape
        bias = self.attention_bias(H, W)
        chunks = x.chunk(self.num_heads, dim=1)
        outs = []
        feat = chunks[0]
        for h, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if h > 0:
                feat = feat + chunks[h]  # cascade: previous head's output joins the next chunk
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q).flatten(2) * self.scale
            attn = (q.transpose(-2, -1) @ k.flatten(2) + bias[h]).softmax(dim=-1)
            feat = (v.flatten(2) @ attn.transpose(-2, -1)).view(B, self.val_dim, H, W)
            outs.append(feat)
        return self.proj(torch.cat(outs, 1))


class LocalWindowAttention(nn.Module):
    """CGA in non-overlapping windows of side ``window`` (zero-pad bottom/right, partition, crop)."""

    def __init__(self, dim, key_dim, num_heads, attn_ratio, resolution, window_resolution, kernels):
        super().__init__()
        self.window = min(window_resolution, resolution)
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio, self.window, kernels)

    def forward(self, x):
        B, C, H, W = x.shape
        r = self.window
        if H <= r and W <= r:
            return self.attn(x)
        pad_b, pad_r = (-H) % r, (-W) % r
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        nh, nw = (H + pad_b) // r, (W + pad_r) // r
        # Partition in rank ≤ 5: (B·C, nh, r, nw, r) → (B·C, nh, nw, r, r) → (B·nh·nw, C, r, r).
        x = x.reshape(B * C, nh, r, nw, r).transpose(2, 3)
        x = x.reshape(B, C, nh * nw, r, r).transpose(1, 2).reshape(B * nh * nw, C, r, r)
        x = self.attn(x)
        x = x.reshape(B, nh * nw, C, r, r).transpose(1, 2).reshape(B * C, nh, nw, r, r)
        x = x.transpose(2, 3).reshape(B, C, nh * r, nw * r)
        if pad_b or pad_r:
            x = x[:, :, :H, :W]
        return x


class EfficientVitBlock(nn.Module):
    """Sandwich block: dw conv, FFN, local window CGA, dw conv, FFN — each residual."""

    def __init__(self, dim, key_dim, num_heads, attn_ratio, resolution, window_resolution, kernels):
        super().__init__()
        self.dw0 = Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim))
        self.ffn0 = Residual(ConvMlp(dim, dim * 2))
        self.mixer = Residual(
            LocalWindowAttention(dim, key_dim, num_heads, attn_ratio, resolution, window_resolution, kernels)
        )
        self.dw1 = Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim))
        self.ffn1 = Residual(ConvMlp(dim, dim * 2))

    def forward(self, x):
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class EfficientVitStage(nn.Module):
    """Optional subsample (residual dw+FFN, patch merging, residual dw+FFN), then blocks."""

    def __init__(self, in_dim, out_dim, key_dim, subsample, num_heads, resolution, window, kernels, depth):
        super().__init__()
        if subsample:
            self.downsample = nn.Sequential(OrderedDict(
                res1=nn.Sequential(Residual(ConvNorm(in_dim, in_dim, 3, 1, 1, groups=in_dim)),
                                   Residual(ConvMlp(in_dim, in_dim * 2))),
                patchmerge=PatchMerging(in_dim, out_dim),
                res2=nn.Sequential(Residual(ConvNorm(out_dim, out_dim, 3, 1, 1, groups=out_dim)),
                                   Residual(ConvMlp(out_dim, out_dim * 2))),
            ))
        else:
            self.downsample = nn.Identity()
        attn_ratio = out_dim / (key_dim * num_heads)
        self.blocks = nn.Sequential(*(
            EfficientVitBlock(out_dim, key_dim, num_heads, attn_ratio, resolution, window, kernels)
            for _ in range(depth)
        ))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class PatchEmbedding(nn.Sequential):
    """Overlapping patch embedding: four 3×3 stride-2 conv+BN with ReLU between (stride 16)."""

    def __init__(self, in_chans, dim):
        super().__init__()
        self.conv1 = ConvNorm(in_chans, dim // 8, 3, 2, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = ConvNorm(dim // 8, dim // 4, 3, 2, 1)
        self.relu2 = nn.ReLU()
        self.conv3 = ConvNorm(dim // 4, dim // 2, 3, 2, 1)
        self.relu3 = nn.ReLU()
        self.conv4 = ConvNorm(dim // 2, dim, 3, 2, 1)


class EfficientVitMsra(nn.Module):
    """Patch embedding → three stages (strides 16, 32, 64) → pool → BN → Linear.

    ``img_size`` is the training resolution: it fixes the size of each stage's bias table (see the
    module docstring); inputs of other sizes are accepted at run time.
    """

    def __init__(self, embed_dim, depth, num_heads, kernels, num_classes=1000, img_size=224,
                 key_dim=KEY_DIM, window_size=WINDOW, drop_rate=0.0):
        super().__init__()
        self.patch_embed = PatchEmbedding(3, embed_dim[0])
        res = stage_resolutions(img_size)
        self.stages = nn.Sequential(*(
            EfficientVitStage(embed_dim[max(i - 1, 0)], embed_dim[i], key_dim, i > 0, num_heads[i],
                              res[i], window_size, kernels, depth[i])
            for i in range(len(embed_dim))
        ))
        self.num_classes = num_classes
        self.num_features = embed_dim[-1]
        self.head = NormLinear(self.num_features, num_classes, drop_rate) if num_classes > 0 else nn.Identity()
        self.stage_names = [f"stages.{i}" for i in range(len(embed_dim))]
        # timm's feature_info and the official downstream backbone: the three stage outputs, no norm.
        self.feature_info = [Feature(16 * 2 ** i, d, f"stages.{i}") for i, d in enumerate(embed_dim)]

    def forward_features(self, x):
        """Image → the stage-3 map, (B, C, H/64, W/64)."""
        return self.stages(self.patch_embed(x))

    def forward_intermediates(self, x, indices):
        """Image → the stage outputs at ``indices`` of ``feature_info`` (strides 16, 32, 64)."""
        return _stage_outputs(self.stages, self.patch_embed(x), indices)

    def forward_head(self, x):
        """Map → logits: global average pool, BatchNorm1d → Linear."""
        return self.head(x.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def convert_state_dict(sd: dict) -> dict:
    """Our layout is timm's. Drops ``attention_bias_idxs`` (a buffer that older timm versions
    saved; it is recomputed) and a DataParallel ``module.`` prefix; else unchanged."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.endswith("attention_bias_idxs")}


def _table_sides(sd: dict) -> list[int] | None:
    sides = []
    for i in range(3):
        t = sd.get(f"stages.{i}.blocks.0.mixer.m.attn.attention_biases")
        if t is None:
            return None
        sides.append(round(t.shape[1] ** 0.5))
    return sides


def infer_kwargs(sd: dict) -> dict:
    """``num_classes`` from the head; ``img_size`` (training resolution) from the bias tables when
    they are not those of 224 (the smallest multiple of 16 whose window sides match)."""
    w = sd.get("head.linear.weight")
    kw = {"num_classes": int(w.shape[0]) if w is not None else 0}
    sides = _table_sides(sd)
    if sides is not None and sides != [min(WINDOW, r) for r in stage_resolutions(224)]:
        for size in range(PATCH, 4096 + 1, PATCH):
            if [min(WINDOW, r) for r in stage_resolutions(size)] == sides:
                kw["img_size"] = size
                break
    return kw


_META = dict(
    family="EfficientViT", paper="EfficientViT (Liu et al., CVPR 2023)", default_res=224,
    res_multiple=16, min_res=32, convert_state_dict=convert_state_dict, infer_kwargs=infer_kwargs,
    weights_note="timm's efficientvit_m* checkpoints (trained at 224) load as is, also those of older "
    "timm versions that saved attention_bias_idxs; official Cream checkpoints need timm's key mapping.",
    # timm efficientvit_msra.py: the efficientvit_m*.r224_in1k cfgs set no crop_pct / interpolation, so
    # timm's PretrainedCfg defaults apply (crop_pct 0.875, 'bicubic', IMAGENET_DEFAULT_MEAN/STD); the same
    # as microsoft/Cream EfficientViT/classification/data/datasets.py (eval: Resize(int(256 / 224 *
    # input_size), interpolation=3 = bicubic), CenterCrop).
    crop_pct=0.875, interpolation="bicubic",
    preprocess_source="timm efficientvit_m*.r224_in1k (PretrainedCfg defaults) = official microsoft/Cream "
    "EfficientViT data/datasets.py: resize 256/224 bicubic, center crop, ImageNet mean/std",
)


def _build(variant: str, num_classes: int, kwargs: dict) -> EfficientVitMsra:
    return EfficientVitMsra(**CONFIGS[variant], num_classes=num_classes, **kwargs)


@register_model(paper_params_m=2.3, paper_macs_m=79, paper_top1=63.2, **_META)
def efficientvit_m0(num_classes: int = 1000, **kwargs) -> EfficientVitMsra:
    """EfficientViT-M0 (timm ``efficientvit_m0``)."""
    return _build("m0", num_classes, kwargs)


@register_model(paper_params_m=3.0, paper_macs_m=167, paper_top1=68.4, **_META)
def efficientvit_m1(num_classes: int = 1000, **kwargs) -> EfficientVitMsra:
    """EfficientViT-M1 (timm ``efficientvit_m1``)."""
    return _build("m1", num_classes, kwargs)


@register_model(paper_params_m=4.2, paper_macs_m=201, paper_top1=70.8, **_META)
def efficientvit_m2(num_classes: int = 1000, **kwargs) -> EfficientVitMsra:
    """EfficientViT-M2 (timm ``efficientvit_m2``)."""
    return _build("m2", num_classes, kwargs)


@register_model(paper_params_m=6.9, paper_macs_m=263, paper_top1=73.4, **_META)
def efficientvit_m3(num_classes: int = 1000, **kwargs) -> EfficientVitMsra:
    """EfficientViT-M3 (timm ``efficientvit_m3``)."""
    return _build("m3", num_classes, kwargs)


@register_model(paper_params_m=8.8, paper_macs_m=299, paper_top1=74.3, **_META)
def efficientvit_m4(num_classes: int = 1000, **kwargs) -> EfficientVitMsra:
    """EfficientViT-M4 (timm ``efficientvit_m4``)."""
    return _build("m4", num_classes, kwargs)


@register_model(paper_params_m=12.4, paper_macs_m=522, paper_top1=77.1, **_META)
def efficientvit_m5(num_classes: int = 1000, **kwargs) -> EfficientVitMsra:
    """EfficientViT-M5 (timm ``efficientvit_m5``)."""
    return _build("m5", num_classes, kwargs)
