"""LITv2: Fast Vision Transformers with HiLo Attention (Pan, Cai & Zhuang, NeurIPS 2022).

Blocks, configs and parameter names follow the official classification code (ziplab/LITv2,
``classification/models``), so its checkpoints (``{'model': state_dict}``) load strictly.

Macro design (four stages at strides 4/8/16/32, widths C·2^i):

- stem ``patch_embed``: 4×4 stride-4 conv + LayerNorm;
- stages 1–2 hold no attention: ``x + DWMlp(LN(x))`` (DWMlp = fc1 → 3×3 depthwise conv → GELU → fc2);
- stages 3–4: ``x + HiLo(LN(x))`` then ``x + DWMlp(LN(x))``. HiLo splits the heads: ``int(heads·α)``
  (α = 0.9) Lo-Fi heads attend from every token to an ``s×s`` average-pooled copy of the map, the
  rest (Hi-Fi) attend inside ``s×s`` windows; ``s`` = 2 in stage 3, 1 in stage 4 (s = 1 makes every
  head Lo-Fi, i.e. plain multi-head self-attention). The Hi-Fi window partition goes through
  rank-6 tensors ``(B, H/s, s, W/s, s, C)`` exactly as the paper's code does; Core ML allows rank
  ≤ 5 only, so the raw model is meant to reach Core ML through a graph pass that rewrites them;
- between stages, Deformable Token Merging (DTM): a deformable 2×2 stride-2 conv (C → 2C; its
  offset conv ``conv_offset`` predicts 8 channels and starts at zero) + BatchNorm2d + GELU;
- head: LayerNorm → mean over tokens → Linear.

The official deformable conv is a CUDA extension; :class:`DeformConv2dPack` here is pure PyTorch
(bilinear ``grid_sample`` with zeros outside the image, then the kernel applied as one 1×1 conv
over the k·k sampled copies), numerically the torchvision ``deform_conv2d`` definition. Unlike the
official code (square 224² maps, ``H = W = sqrt(N)``) every block is told the map's height and
width, so any H, W that are multiples of 32 work, square or not.

MACs. The paper's GFLOPs are MACs from the official ``model.flops()`` formulas (not fvcore).
Against ``torch.utils.flop_counter`` (which counts convs and matmuls only) they add: one op per
element for every LayerNorm (stem, ``norm1``/``norm2``, final ``norm``) and every DTM BatchNorm; one
per output element for the bias of each 3×3 depthwise conv and of the DTM's deformable conv and
offset conv (not the stem conv's); the DTM offset conv counted with **12** output channels (it has
8); and the final token average, counted as ``C·(H/4)(W/4)/16`` (4× the 7×7 map it really
averages). Neither counts the deformable conv's bilinear sampling (``grid_sample`` here; the
official formula counts only the offset conv and the 2×2 conv) nor the softmax; both count every
Linear and attention matmul alike. :func:`official_flops_extra` is that difference (official −
flop_counter): at 224², ``count_macs`` + ``official_flops_extra`` equals the official formulas
exactly, and that sum rounds to the paper's GFLOPs (``tests/test_litv2.py`` measures both; the
counts themselves are shown by ``edgevit-export list`` / ``info``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import Feature, tokens_to_map
from ..registry import register_model

# Per variant (official configs/litv2-{small,medium,base}.yaml). Shared: patch 4, mlp ratio 4,
# qkv bias, alpha 0.9, local window 2 in stage 3 and 1 in stage 4, attention in stages 3-4 only.
CONFIGS = {
    "s": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "m": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
ALPHA = 0.9
LOCAL_WS = (0, 0, 2, 1)
HAS_MSA = (False, False, True, True)
MLP_RATIO = 4.0


class PatchEmbed(nn.Module):
    """Stem: non-overlapping 4×4 patches → linear projection (a stride-4 conv) → LayerNorm."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, patch_size: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        p = self.proj.stride[0]
        if x.shape[2] % p or x.shape[3] % p:   # the detection code: zeros right and bottom up to a multiple
            x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class DWConv(nn.Module):
    """3×3 depthwise conv on a token sequence (tokens → map → conv → tokens)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, hw):
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        return self.dwconv(x).flatten(2).transpose(1, 2)


class DWMlp(nn.Module):
    """The FFN of LITv2: fc1 → 3×3 depthwise conv → GELU → fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        conv = self.dwconv.dwconv  # official init: normal(0, sqrt(2 / fan_out)), zero bias
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1])))
        nn.init.zeros_(conv.bias)

    def forward(self, x, hw):
        return self.fc2(self.act(self.dwconv(self.fc1(x), hw)))


class HiLo(nn.Module):
    """HiLo attention: Hi-Fi heads (local ``ws×ws`` windows) ‖ Lo-Fi heads (keys/values from an
    ``ws×ws`` average-pooled map). ``ws == 1`` gives plain multi-head self-attention (all Lo-Fi)."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 2, alpha: float = 0.5,
                 qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        head_dim = dim // num_heads
        self.dim, self.ws = dim, window_size
        self.l_heads = int(num_heads * alpha)
        self.h_heads = num_heads - self.l_heads
        if window_size == 1:
            self.l_heads, self.h_heads = num_heads, 0
        self.l_dim, self.h_dim = self.l_heads * head_dim, self.h_heads * head_dim
        self.scale = head_dim ** -0.5
        if self.l_heads > 0:
            if window_size != 1:
                self.sr = nn.AvgPool2d(kernel_size=window_size, stride=window_size)
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, self.l_dim * 2, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads > 0:
            self.h_qkv = nn.Linear(dim, self.h_dim * 3, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def hifi(self, x):
        """Self-attention inside each ws×ws window (window partition through rank-6 tensors)."""
        b, h, w, c = x.shape
        ws, hg, wg = self.ws, h // self.ws, w // self.ws
        x = x.reshape(b, hg, ws, wg, ws, c).transpose(2, 3)  # B, hg, wg, ws, ws, C
        qkv = self.h_qkv(x).reshape(b, hg * wg, ws * ws, 3, self.h_heads, self.h_dim // self.h_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each B, groups, heads, ws*ws, d
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(2, 3).reshape(b, hg, wg, ws, ws, self.h_dim)
        x = x.transpose(2, 3).reshape(b, h, w, self.h_dim)
        return self.h_proj(x)

    def lofi(self, x):
        """Every token queries keys/values of the ws×ws average-pooled map."""
        b, h, w, c = x.shape
        d = self.l_dim // self.l_heads
        q = self.l_q(x).reshape(b, h * w, self.l_heads, d).permute(0, 2, 1, 3)
        if self.ws > 1:
            x = self.sr(x.permute(0, 3, 1, 2)).reshape(b, c, -1).permute(0, 2, 1)
        kv = self.l_kv(x).reshape(b, -1, 2, self.l_heads, d).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, h, w, self.l_dim)
        return self.l_proj(x)

    def forward(self, x, hw):
        b, n, c = x.shape
        h, w = hw
        x = x.reshape(b, h, w, c)
        pad_b, pad_r = -h % self.ws, -w % self.ws
        if pad_b or pad_r:   # the detection code: zeros right and bottom up to whole windows, cropped after
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        if self.h_heads == 0:
            out = self.lofi(x)
        elif self.l_heads == 0:
            out = self.hifi(x)
        else:
            out = torch.cat((self.hifi(x), self.lofi(x)), dim=-1)
        if pad_b or pad_r:
            out = out[:, :h, :w]
        return out.reshape(b, n, c)


class ConvFFNBlock(nn.Module):
    """Stage 1–2 block (no attention): x + DWMlp(LN(x))."""

    def __init__(self, dim: int, mlp_ratio: float = MLP_RATIO):
        super().__init__()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = DWMlp(dim, int(dim * mlp_ratio))

    def forward(self, x, hw):
        return x + self.mlp(self.norm2(x), hw)


class Block(nn.Module):
    """Stage 3–4 block: x + HiLo(LN(x)), then x + DWMlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, local_ws: int, alpha: float, mlp_ratio: float = MLP_RATIO):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HiLo(dim, num_heads, window_size=local_ws, alpha=alpha)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = DWMlp(dim, int(dim * mlp_ratio))

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)
        return x + self.mlp(self.norm2(x), hw)


class DeformConv2dPack(nn.Module):
    """Deformable convolution (DCNv1, one offset group) with its own offset predictor.

    ``conv_offset`` (a plain conv with the same kernel/stride/padding, zero-initialised) predicts
    per output position and kernel tap a (dy, dx) shift, in torchvision's channel order
    ``[tap = ki·kw + kj][dy, dx]``. Each tap is read at ``(i·s − p + ki·d + dy, j·s − p + kj·d + dx)``
    by bilinear interpolation, zero outside the input. All taps are sampled with one
    ``grid_sample`` (taps stacked along the height of the sampling grid, so no tensor exceeds rank 5),
    and the kernel is then applied as a 1×1 conv over the C·k·k sampled channels.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2,
                 padding: int = 0, dilation: int = 1):
        super().__init__()
        self.k, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -1 / math.sqrt(in_channels * kernel_size ** 2), 1 / math.sqrt(in_channels * kernel_size ** 2))
        self.conv_offset = nn.Conv2d(in_channels, 2 * kernel_size ** 2, kernel_size, stride, padding)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        return deform_conv2d(x, self.conv_offset(x), self.weight, self.bias, self.stride, self.padding, self.dilation)


def deform_conv2d(x, offset, weight, bias, stride: int = 1, padding: int = 0, dilation: int = 1):
    """torchvision-style ``deform_conv2d`` (one offset group, groups = 1) in exportable ops."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = offset.shape[2], offset.shape[3]
    taps = kh * kw
    off = offset.reshape(b, taps, 2, ho, wo)
    # Undeformed sampling positions per tap and output position (pixel units).
    ky = torch.arange(kh, dtype=x.dtype, device=x.device).repeat_interleave(kw) * dilation
    kx = torch.arange(kw, dtype=x.dtype, device=x.device).repeat(kh) * dilation
    oy = torch.arange(ho, dtype=x.dtype, device=x.device) * stride - padding
    ox = torch.arange(wo, dtype=x.dtype, device=x.device) * stride - padding
    py = ky.reshape(1, taps, 1, 1) + oy.reshape(1, 1, ho, 1) + off[:, :, 0]
    px = kx.reshape(1, taps, 1, 1) + ox.reshape(1, 1, 1, wo) + off[:, :, 1]
    # align_corners=True: -1 and 1 are the centres of the first and last pixels.
    gx = px * (2.0 / max(w - 1, 1)) - 1.0
    gy = py * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1).reshape(b, taps * ho, wo, 2)
    cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    cols = cols.reshape(b, c * taps, ho, wo)  # channel index = c·taps + tap, as in weight.reshape
    return F.conv2d(cols, weight.reshape(o, c * taps, 1, 1), bias)


class DTM(nn.Module):
    """Deformable Token Merging: deformable 2×2 stride-2 conv (C → 2C) + BatchNorm2d + GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.dconv = DeformConv2dPack(dim, dim * 2, kernel_size=2, stride=2, padding=0)
        self.norm_layer = nn.BatchNorm2d(dim * 2)
        self.act_layer = nn.GELU()

    def forward(self, x, hw):
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        x = self.act_layer(self.norm_layer(self.dconv(x)))
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class LITLayer(nn.Module):
    """One stage: its blocks, then (stages 1–3) the DTM that halves the map for the next stage."""

    def __init__(self, dim: int, depth: int, num_heads: int, has_msa: bool, local_ws: int,
                 alpha: float, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, local_ws, alpha) if has_msa else ConvFFNBlock(dim) for _ in range(depth)
        )
        self.downsample = DTM(dim) if downsample else None

    def forward(self, x, hw):
        for blk in self.blocks:
            x = blk(x, hw)
        if self.downsample is not None:
            x, hw = self.downsample(x, hw)
        return x, hw


class LITv2(nn.Module):
    """LITv2 classifier: stem → four LITLayers (DTM between them) → LayerNorm → token mean → head."""

    def __init__(self, embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 num_classes: int = 1000, in_chans: int = 3, alpha: float = ALPHA,
                 local_ws=LOCAL_WS, has_msa=HAS_MSA):
        super().__init__()
        self.num_classes = num_classes
        n = len(depths)
        self.num_features = embed_dim * 2 ** (n - 1)
        self.patch_embed = PatchEmbed(in_chans, embed_dim)
        self.layers = nn.ModuleList(
            LITLayer(embed_dim * 2 ** i, depths[i], num_heads[i], has_msa[i], local_ws[i], alpha, i < n - 1)
            for i in range(n)
        )
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        # Per-stage feature maps (token layout B, N, C): the last block of each stage, before DTM.
        self.stage_names = [f"layers.{i}.blocks.{depths[i] - 1}" for i in range(n)]
        # The official detection backbone (ziplab/LITv2 detection/mmdet backbones/litv2.py): each stage
        # before its DTM; strides 8–32 through a LayerNorm it adds (norm1..3: fresh, γ=1 β=0, with
        # ImageNet weights — a per-token standardisation), stride 4 as it is; not the classifier's norm.
        self.feature_info = [Feature(4 * 2 ** i, embed_dim * 2 ** i, self.stage_names[i],
                                     "LayerNorm (fresh, as the detection backbone adds)" if i else "")
                             for i in range(n)]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x):
        """Image → the stage-4 map after the final LayerNorm, (B, C, H/32, W/32). (Other sizes are
        padded as the detection backbone pads, see PAD; the registry's classifier takes multiples of 32.)"""
        x, hw = self.patch_embed(x)
        for layer in self.layers:
            x, hw = layer(x, hw)
        x = self.norm(x)  # final LayerNorm, per token
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])  # tokens → (B, C, H/32, W/32)

    def forward_intermediates(self, x, indices):
        """Image → the maps at ``indices`` of ``feature_info`` (strides 4, 8, 16, 32), as the official
        detection backbone outputs them."""
        x, hw = self.patch_embed(x)   # any size: padded as the detection backbone pads (see PAD)
        outs = []
        for i, layer in enumerate(self.layers[:max(indices) + 1]):
            for blk in layer.blocks:
                x = blk(x, hw)
            if i in indices:
                outs.append(tokens_to_map(F.layer_norm(x, x.shape[-1:]) if i else x, hw))
            if layer.downsample is not None:
                x, hw = layer.downsample(x, hw)
        return outs

    def forward_head(self, x):
        """Map → logits: mean over the tokens, Linear."""
        return self.head(x.flatten(2).transpose(1, 2).mean(dim=1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def official_flops_extra(model: LITv2, res: tuple[int, int] = (224, 224)) -> int:
    """What the official ``flops()`` formulas count on top of ``torch.utils.flop_counter`` (MACs).

    Per element: each LayerNorm (stem, norm1/norm2, final norm) and each DTM BatchNorm; per output
    element: the bias of the depthwise convs and of the DTM's deformable conv and offset conv; the
    DTM offset conv (weights and bias) counted with 12 output channels instead of its 8; and the
    final token average, which the official code counts as ``num_features · (H/4)(W/4) / 16``.
    """
    h, w = res[0] // 4, res[1] // 4
    c0 = model.patch_embed.proj.out_channels
    extra = h * w * c0  # stem LayerNorm (the official count leaves out the stem conv bias)
    for i, layer in enumerate(model.layers):
        c, hi, wi = c0 * 2 ** i, h >> i, w >> i
        for blk in layer.blocks:
            hidden = blk.mlp.fc1.out_features
            norms = 2 if isinstance(blk, Block) else 1
            extra += norms * c * hi * wi + hidden * hi * wi  # LayerNorms + depthwise conv bias
        if layer.downsample is not None:
            ho, wo = hi // 2, wi // 2
            extra += 4 * c * 4 * ho * wo + 12 * ho * wo  # offset conv as 12 channels (+ bias)
            extra += 2 * c * ho * wo  # deformable conv bias
            extra += 2 * c * ho * wo  # BatchNorm
    extra += model.num_features * h * w // 16  # final average (official: patches // 2**num_layers)
    return extra


def _infer(sd: dict) -> dict:
    w = sd.get("head.weight")
    return {"num_classes": int(w.shape[0]) if w is not None else 0}


# How the official detection backbone (detection/mmdet/models/backbones/litv2.py, ziplab/LITv2#6) takes
# sizes that are not multiples of 32; ``export --features`` does the same.
PAD = ("padded as LITv2's detection backbone pads: the image with zeros right/bottom to a multiple of 4, "
       "each HiLo map to whole windows (cropped back); a DTM drops an odd last row/column")

_META = dict(
    family="LITv2", paper="LITv2 (Pan et al., NeurIPS 2022)", default_res=224,
    res_multiple=32, min_res=64, infer_kwargs=_infer, features_pad=PAD,
    weights_note="official ziplab/LITv2 checkpoints ({'model': sd}) load as they are",
    # ziplab/LITv2 classification/data/build.py build_transform (eval, Swin's) with config.py defaults
    # TEST.CROP = True, DATA.INTERPOLATION = 'bicubic' (the litv2-*.yaml configs keep them):
    # Resize(int(256 / 224 * IMG_SIZE), bicubic), CenterCrop(IMG_SIZE), IMAGENET_DEFAULT_MEAN/STD.
    crop_pct=0.875, interpolation="bicubic",
    preprocess_source="official eval transform (ziplab/LITv2 classification/data/build.py + config.py: "
                      "TEST.CROP, resize 256/224, DATA.INTERPOLATION bicubic, ImageNet mean/std)",
)


def _build(variant: str, num_classes: int, **kwargs) -> LITv2:
    return LITv2(**{**CONFIGS[variant], **kwargs}, num_classes=num_classes)


@register_model(paper_params_m=28, paper_macs_m=3700, paper_top1=82.0, **_META)
def litv2_s(num_classes: int = 1000, **kwargs) -> LITv2:
    return _build("s", num_classes, **kwargs)


@register_model(paper_params_m=49, paper_macs_m=7500, paper_top1=83.3, **_META)
def litv2_m(num_classes: int = 1000, **kwargs) -> LITv2:
    return _build("m", num_classes, **kwargs)


@register_model(paper_params_m=87, paper_macs_m=13200, paper_top1=83.6, **_META)
def litv2_b(num_classes: int = 1000, **kwargs) -> LITv2:
    return _build("b", num_classes, **kwargs)
