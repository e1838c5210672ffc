"""FastViT (Vasu et al., ICCV 2023): a hybrid vision transformer designed for structural
reparameterisation, in timm's parameter layout (``timm/models/fastvit.py``), so that timm's
``fastvit_*.apple_in1k`` / ``apple_dist_in1k`` state dicts load with strict key matching.

Train-time form (what timm builds and what its checkpoints hold):

- Stem: three MobileOne blocks (3×3 stride-2 conv 3→C, 3×3 stride-2 depthwise, 1×1 conv), GELU.
  A MobileOne block sums parallel branches — k×k conv+BN (``conv_kxk``), 1×1 conv+BN
  (``conv_scale``) and a BN-only skip (``identity``) where shapes allow — then (SE and) GELU.
- Stages 2–4 open with a PatchEmbed: a RepLKNet-style 7×7 stride-2 grouped conv (groups = C_in,
  C_in→2·C_in) with a parallel 3×3 conv, then a 1×1 MobileOne block. The SA variants add a
  conditional positional encoding (RepCPE: 7×7 depthwise conv + skip) before stage 4.
- RepMixer block: ``x + γ·(mixer(x) − norm(x))`` with 3×3 depthwise MobileOne branches, then a
  ConvFFN (7×7 depthwise conv+BN, 1×1 expand, GELU, 1×1 project) with layer scale. The SA
  variants use MHSA (BatchNorm pre-norm, head_dim 32) instead of RepMixer in stage 4.
- Head: MobileOne 3×3 grouped conv to 2× width with squeeze-excite (ratio 1/16), global average
  pool, linear (``head.fc``).

:meth:`FastViT.prepare_for_export` turns it into the inference form in place, exactly as timm's
``reparameterize_model``: every MobileOne block, large-kernel conv, RepMixer and RepCPE becomes a
single conv with bias (``reparam_conv``). ConvFFN's conv+BN and the attention pre-norm are not
reparameterised (timm leaves them too). ``inference_mode=True`` builds that form directly, so
reparameterised checkpoints load as well.

Figures at 256×256 (the paper's resolution and timm's default). Params and MACs are measured by
``edgevit-export list`` / ``info`` (the train-time form, the one timm's checkpoints hold), shown
beside the paper's; ``tests/test_fastvit.py`` checks how they relate:

- Parameters match timm's counts of the train-time form; reparameterisation removes under 1% of
  them. The paper's counts lie several percent below even the reparameterised model, and no
  counting convention we tried reproduces all three (leaving out the classifier; a plain C→1000
  linear in place of the 2×-wide final conv (SE) and classifier fits T12 and SA12, not T8). The
  released checkpoints are not quite the paper's models either: the authors' repository
  (apple/ml-fastvit) lists a higher top-1 for each than the paper does. We keep the architecture
  that the released (and timm's) weights need and show the paper's figures as the paper's.
- MACs: ``torch.utils.flop_counter`` counts convs, linears and the attention matmuls (not BN,
  activations, pooling, SE gating). The paper gives one decimal; ours round to it (within its
  ±0.05 G rounding). timm's model cards list slightly more for the train-time form (its profiler
  counts more than ours).
- Top-1 is the paper's (ImageNet-1k, 256, without distillation).

Resolution: the stem and the three PatchEmbeds halve H and W with 'same' padding; attention (SA)
and SE are global, RepCPE is a convolution, so any size works. The registry offers multiples of 32
(all stage maps exact) from 64 up; H and W independently.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import Feature, stage_outputs as _stage_outputs
from ..registry import register_model

PAPER = "FastViT (Vasu et al., ICCV 2023)"

# layers / widths / FFN ratios per stage; SA variants put attention (+ RepCPE) in stage 4.
CONFIGS = {
    "fastvit_t8": dict(layers=(2, 2, 4, 2), embed_dims=(48, 96, 192, 384), mlp_ratio=3.0, attention_last=False),
    "fastvit_t12": dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), mlp_ratio=3.0, attention_last=False),
    "fastvit_sa12": dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), mlp_ratio=4.0, attention_last=True),
}


# ---------------------------------------------------------------- reparameterisation helpers


def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv kernel, BN) → kernel and bias of one conv computing BN(conv(x)) in eval mode."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _identity_kernel(channels: int, groups: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """k×k grouped-conv kernel that copies its input (a 1 at the centre of each own channel)."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, k, k, dtype=like.dtype, device=like.device)
    c = torch.arange(channels)
    w[c, c % per_group, k // 2, k // 2] = 1.0
    return w


def _conv_from(weight: torch.Tensor, bias: torch.Tensor, stride: int, groups: int) -> nn.Conv2d:
    """A conv with bias holding the given fused kernel ('same' padding k//2, as timm)."""
    out_chs, per_group, k, _ = weight.shape
    conv = nn.Conv2d(per_group * groups, out_chs, k, stride, k // 2, groups=groups, bias=True)
    conv.weight = nn.Parameter(weight.detach().clone())
    conv.bias = nn.Parameter(bias.detach().clone())
    return conv.to(weight.device)


# ---------------------------------------------------------------- building blocks


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm, no activation: timm's ``ConvNormAct(apply_act=False)``."""

    def __init__(self, in_chs: int, out_chs: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x):
        return self.bn(self.conv(x))

    def fused(self):
        return _fuse_bn(self.conv.weight, self.bn)


class SqueezeExcite(nn.Module):
    """Squeeze-excite (timm ``SEModule``): global mean → 1×1 conv → ReLU → 1×1 conv → sigmoid gate."""

    def __init__(self, channels: int, rd_ratio: float = 1 / 16):
        super().__init__()
        rd = int(channels * rd_ratio + 0.5)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd, channels, 1)

    def forward(self, x):
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class MobileOneBlock(nn.Module):
    """MobileOne block (Vasu et al., CVPR 2023): at train time a sum of k×k conv+BN branches, a 1×1
    conv+BN "scale" branch and a BN skip; at inference one k×k conv. Then optional SE, GELU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 use_se: bool = False, use_act: bool = True, use_scale_branch: bool = True,
                 num_conv_branches: int = 1, inference_mode: bool = False):
        super().__init__()
        self.in_chs, self.out_chs, self.kernel_size = in_chs, out_chs, kernel_size
        self.stride, self.groups = stride, groups
        self.se = SqueezeExcite(out_chs) if use_se else nn.Identity()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2,
                                          groups=groups, bias=True)
        else:
            self.reparam_conv = None
            self.identity = nn.BatchNorm2d(in_chs) if in_chs == out_chs and stride == 1 else None
            self.conv_kxk = nn.ModuleList(
                ConvBN(in_chs, out_chs, kernel_size, stride, groups) for _ in range(num_conv_branches)
            ) if num_conv_branches > 0 else None
            self.conv_scale = (ConvBN(in_chs, out_chs, 1, stride, groups)
                               if kernel_size > 1 and use_scale_branch else None)
        self.act = nn.GELU() if use_act else nn.Identity()

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        outs = [b(x) for b in (self.conv_scale, self.identity) if b is not None]
        outs += [conv(x) for conv in (self.conv_kxk or ())]
        return self.act(self.se(sum(outs[1:], outs[0])))

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the single conv equal to the sum of the branches (eval-mode BN)."""
        if self.reparam_conv is not None:
            return self.reparam_conv.weight, self.reparam_conv.bias
        k = self.kernel_size
        ref = next(self.parameters())
        w = torch.zeros(self.out_chs, self.in_chs // self.groups, k, k, dtype=ref.dtype, device=ref.device)
        b = torch.zeros(self.out_chs, dtype=ref.dtype, device=ref.device)
        for conv in self.conv_kxk or ():
            cw, cb = conv.fused()
            w, b = w + cw, b + cb
        if self.conv_scale is not None:
            sw, sb = self.conv_scale.fused()
            w, b = w + F.pad(sw, [k // 2] * 4), b + sb
        if self.identity is not None:
            iw, ib = _fuse_bn(_identity_kernel(self.in_chs, self.groups, k, w), self.identity)
            w, b = w + iw, b + ib
        return w, b

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w, b = self.fused()
        self.reparam_conv = _conv_from(w, b, self.stride, self.groups)
        del self.identity, self.conv_kxk, self.conv_scale


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet-style large-kernel conv: k×k conv+BN plus a parallel small-kernel conv+BN; one
    k×k conv at inference. (timm's SE/activation slots are unused by these variants.)"""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int,
                 small_kernel: int = 3, inference_mode: bool = False):
        super().__init__()
        self.kernel_size, self.small_kernel, self.stride, self.groups = kernel_size, small_kernel, stride, groups
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2,
                                          groups=groups, bias=True)
        else:
            self.reparam_conv = None
            self.large_conv = ConvBN(in_chs, out_chs, kernel_size, stride, groups)
            self.small_conv = ConvBN(in_chs, out_chs, small_kernel, stride, groups)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.large_conv(x) + self.small_conv(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w, b = self.large_conv.fused()
        sw, sb = self.small_conv.fused()
        w = w + F.pad(sw, [(self.kernel_size - self.small_kernel) // 2] * 4)
        self.reparam_conv = _conv_from(w, b + sb, self.stride, self.groups)
        del self.large_conv, self.small_conv


class LayerScale2d(nn.Module):
    """Per-channel learnable scale γ of shape (C, 1, 1)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x * self.gamma


class RepMixer(nn.Module):
    """RepMixer token mixer: ``x + γ·(mixer(x) − norm(x))`` with depthwise k×k MobileOne branches
    (``norm`` is a BN skip only); folds into one depthwise conv at inference (no skip left)."""

    def __init__(self, dim: int, kernel_size: int = 3, inference_mode: bool = False):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=True)
        else:
            self.reparam_conv = None
            self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False,
                                       use_scale_branch=False, num_conv_branches=0)
            self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False)
            self.layer_scale = LayerScale2d(dim)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        wm, bm = self.mixer.fused()
        wn, bn = self.norm.fused()
        gamma = self.layer_scale.gamma
        w = _identity_kernel(self.dim, self.dim, self.kernel_size, wm) + gamma.unsqueeze(-1) * (wm - wn)
        b = gamma.flatten() * (bm - bn)
        self.reparam_conv = _conv_from(w, b, 1, self.dim)
        del self.mixer, self.norm, self.layer_scale


class RepConditionalPosEnc(nn.Module):
    """Conditional positional encoding (Chu et al.): ``x + dwconv7x7(x)``; one conv at inference."""

    def __init__(self, dim: int, spatial: int = 7, inference_mode: bool = False):
        super().__init__()
        self.dim, self.spatial = dim, spatial
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, spatial, 1, spatial // 2, groups=dim, bias=True)
        else:
            self.reparam_conv = None
            self.pos_enc = nn.Conv2d(dim, dim, spatial, 1, spatial // 2, groups=dim, bias=True)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.pos_enc(x) + x

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w = _identity_kernel(self.dim, self.dim, self.spatial, self.pos_enc.weight) + self.pos_enc.weight
        self.reparam_conv = _conv_from(w, self.pos_enc.bias, 1, self.dim)
        del self.pos_enc


class ConvMlp(nn.Module):
    """ConvFFN: 7×7 depthwise conv+BN, 1×1 expand, GELU, 1×1 project."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv = ConvBN(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        for m in (self.conv.conv, self.fc1, self.fc2):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))


class Attention(nn.Module):
    """Multi-head self-attention over the H·W tokens of a (B, C, H, W) map (head_dim 32, no qkv bias)."""

    def __init__(self, dim: int, head_dim: int = 32):
        super().__init__()
        self.head_dim, self.num_heads = head_dim, dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        x = x.flatten(2).transpose(1, 2)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x).transpose(1, 2).reshape(B, C, H, W)


class RepMixerBlock(nn.Module):
    """MetaFormer block with RepMixer token mixing and ConvFFN."""

    def __init__(self, dim: int, mlp_ratio: float, inference_mode: bool = False):
        super().__init__()
        self.token_mixer = RepMixer(dim, 3, inference_mode)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


class AttentionBlock(nn.Module):
    """MetaFormer block with MHSA token mixing (BatchNorm pre-norm) and ConvFFN."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = Attention(dim)
        self.layer_scale_1 = LayerScale2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_2 = LayerScale2d(dim)

    def forward(self, x):
        x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
        return x + self.layer_scale_2(self.mlp(x))


class PatchEmbed(nn.Module):
    """Downsampling between stages: 7×7 stride-2 large-kernel conv (groups = C_in) → 1×1 MobileOne."""

    def __init__(self, in_chs: int, embed_dim: int, inference_mode: bool = False):
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_chs, embed_dim, 7, 2, groups=in_chs, small_kernel=3,
                                   inference_mode=inference_mode),
            MobileOneBlock(embed_dim, embed_dim, 1, inference_mode=inference_mode),
        )

    def forward(self, x):
        return self.proj(x)


class FastVitStage(nn.Module):
    def __init__(self, dim: int, dim_out: int, depth: int, attention: bool, mlp_ratio: float,
                 inference_mode: bool = False):
        super().__init__()
        self.downsample = PatchEmbed(dim, dim_out, inference_mode) if dim != dim_out else nn.Identity()
        self.pos_emb = RepConditionalPosEnc(dim_out, 7, inference_mode) if attention else nn.Identity()
        self.blocks = nn.Sequential(*(
            AttentionBlock(dim_out, mlp_ratio) if attention else RepMixerBlock(dim_out, mlp_ratio, inference_mode)
            for _ in range(depth)
        ))

    def forward(self, x):
        return self.blocks(self.pos_emb(self.downsample(x)))


class ClassifierHead(nn.Module):
    """Global average pool → linear (timm ``ClassifierHead``, key ``head.fc``)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class FastViT(nn.Module):
    def __init__(self, layers, embed_dims, mlp_ratio: float, attention_last: bool,
                 num_classes: int = 1000, cls_ratio: float = 2.0, inference_mode: bool = False):
        super().__init__()
        c0 = embed_dims[0]
        self.stem = nn.Sequential(
            MobileOneBlock(3, c0, 3, stride=2, inference_mode=inference_mode),
            MobileOneBlock(c0, c0, 3, stride=2, groups=c0, inference_mode=inference_mode),
            MobileOneBlock(c0, c0, 1, inference_mode=inference_mode),
        )
        stages, prev = [], c0
        for i, (depth, dim) in enumerate(zip(layers, embed_dims)):
            attention = attention_last and i == len(layers) - 1
            stages.append(FastVitStage(prev, dim, depth, attention, mlp_ratio, inference_mode))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.num_classes = num_classes
        self.num_features = int(prev * cls_ratio)
        self.final_conv = MobileOneBlock(prev, self.num_features, 3, groups=prev, use_se=True,
                                         inference_mode=inference_mode)
        self.head = ClassifierHead(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.stage_names = [f"stages.{i}" for i in range(len(layers))]
        # timm's feature_info: the four stage outputs (strides 4–32); final_conv belongs to the head.
        self.feature_info = [Feature(4 * 2 ** i, d, f"stages.{i}") for i, d in enumerate(embed_dims)]

    def forward_features(self, x):
        """Image → the map of the final 3×3 conv (SE, 2× the stage-4 width), (B, C, H/32, W/32)."""
        return self.final_conv(self.stages(self.stem(x)))

    def forward_intermediates(self, x, indices):
        """Image → the stage outputs at ``indices`` of ``feature_info`` (strides 4, 8, 16, 32)."""
        return _stage_outputs(self.stages, self.stem(x), indices)

    def forward_head(self, x):
        """Map → logits: global average pool, Linear."""
        return self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def prepare_for_export(self) -> None:
        """Structural reparameterisation in place (timm's ``reparameterize_model``): every
        multi-branch module becomes one conv; outputs are unchanged in eval mode."""
        self.eval()
        for m in list(self.modules()):
            if m is not self and hasattr(m, "reparameterize"):
                m.reparameterize()


# ---------------------------------------------------------------- checkpoints and registration


def convert_state_dict(sd: dict) -> dict:
    """Our layout is timm's (train-time or reparameterised): passed through unchanged."""
    return dict(sd)


def infer_kwargs(sd: dict) -> dict:
    kw = {}
    if "head.fc.weight" in sd:
        kw["num_classes"] = int(sd["head.fc.weight"].shape[0])
    if "stem.0.reparam_conv.weight" in sd:
        kw["inference_mode"] = True
    return kw


def _meta(params_m: float, gflops: float, top1: float) -> dict:
    return dict(
        family="FastViT", paper=PAPER, default_res=256, paper_params_m=params_m,
        # timm fastvit.py _cfg (fastvit_t8/t12/sa12 .apple_in1k and .apple_dist_in1k):
        # 'crop_pct': 0.9, 'interpolation': 'bicubic', IMAGENET_DEFAULT_MEAN/STD.
        crop_pct=0.9, interpolation="bicubic",
        preprocess_source="timm fastvit_*.apple_in1k / apple_dist_in1k pretrained cfg (crop_pct 0.9, bicubic, "
                          "ImageNet mean/std)",
        paper_macs_m=gflops * 1000, paper_top1=top1, res_multiple=32, min_res=64,
        convert_state_dict=convert_state_dict, infer_kwargs=infer_kwargs,
        weights_note=("timm layout (fastvit_*.apple_in1k / apple_dist_in1k), train-time form; "
                      "reparameterised state dicts load too. Exports are reparameterised."),
        params_note=("timm's train-time model (the form its checkpoints hold); reparameterisation at "
                     "export removes under 1% of it. The paper's figure lies below even the "
                     "reparameterised model and no counting convention we tried reproduces it; the "
                     "released checkpoints' top-1 differs from the paper's too (edgevit_export/models/fastvit.py)."),
    )


def _build(name: str, num_classes: int, inference_mode: bool) -> FastViT:
    return FastViT(**CONFIGS[name], num_classes=num_classes, inference_mode=inference_mode)


@register_model(**_meta(3.6, 0.7, 75.6))
def fastvit_t8(num_classes: int = 1000, inference_mode: bool = False) -> FastViT:
    return _build("fastvit_t8", num_classes, inference_mode)


@register_model(**_meta(6.8, 1.4, 79.1))
def fastvit_t12(num_classes: int = 1000, inference_mode: bool = False) -> FastViT:
    return _build("fastvit_t12", num_classes, inference_mode)


@register_model(**_meta(10.9, 1.9, 80.6))
def fastvit_sa12(num_classes: int = 1000, inference_mode: bool = False) -> FastViT:
    return _build("fastvit_sa12", num_classes, inference_mode)
