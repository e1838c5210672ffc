"""MobileNetV3 (Howard et al., ICCV 2019), built exactly as timm's ``mobilenetv3_{small,large}_100``.

Users' weights for this baseline come from timm, so the parameter names are timm's
(``conv_stem``/``bn1``, ``blocks.<stage>.<block>`` with ``conv_pw``/``conv_dw``/``se.conv_reduce``/
``se.conv_expand``/``conv_pwl``, ``conv_head``, ``classifier``) and a timm state dict loads
strictly, unchanged. The block tables below are the paper's Tables 1 and 2 (kernel, expansion
size, output channels, squeeze-excite, nonlinearity, stride), grouped into stages as timm groups
them. Blocks:

- depthwise-separable block (first block, expansion size == input): dw conv → BN+act → [SE] →
  1×1 conv → BN (no act), residual when stride 1 and widths match;
- inverted residual ("bneck"): 1×1 expand → BN+act → k×k dw conv → BN+act → [SE] → 1×1 project
  → BN, residual when stride 1 and widths match;
- last stage: 1×1 conv → BN+hard-swish; "efficient last stage" head: global average pool → 1×1
  conv with bias (1280 / 1024 channels) → hard-swish → Linear.
- Squeeze-excite: mean → 1×1 conv (expansion/4, rounded to a multiple of 8) → ReLU → 1×1 conv →
  hard-sigmoid gate. Nonlinearity "RE" = ReLU, "HS" = hard-swish (stem: hard-swish).

All convs pad k//2 (timm's default, not TF "same"), so any input size works; we accept multiples
of 32 (the network stride), at least 32 (1×1 final map).

Against the paper at 224×224 (the counts themselves are measured by ``edgevit-export list`` /
``info``; ``tests/test_mobilenetv3.py`` checks these relations):

- Params equal timm's counts (and the trainable parameters of the official TF/Keras models). The
  paper prints them truncated to one decimal, not rounded, so both sit more than 1% above the
  printed figure with no layer missing or extra (dropping BN's affine parameters would not bring
  either within 1%).
- MACs (torch.utils.flop_counter: convs and the linear layer, the squeeze-excite 1×1 convs on
  1×1 maps included) round to the reference figures in whole millions; without SE's convs they
  would not, so the reference counts SE's convs too. flop_counter leaves out BN,
  hard-swish/hard-sigmoid, the SE gate multiply, pooling and residual adds.
"""

from __future__ import annotations

import torch.nn as nn

from ..features import Feature
from ..registry import register_model

RE, HS = "relu", "hardswish"

# Paper Tables 1/2: (kernel, expansion size, out channels, squeeze-excite, nonlinearity, stride);
# one inner list per timm stage (``blocks.<i>``). The last stage is a 1×1 conv (out channels).
LARGE = dict(
    stages=[
        [(3, 16, 16, False, RE, 1)],
        [(3, 64, 24, False, RE, 2), (3, 72, 24, False, RE, 1)],
        [(5, 72, 40, True, RE, 2), (5, 120, 40, True, RE, 1), (5, 120, 40, True, RE, 1)],
        [(3, 240, 80, False, HS, 2), (3, 200, 80, False, HS, 1), (3, 184, 80, False, HS, 1),
         (3, 184, 80, False, HS, 1)],
        [(3, 480, 112, True, HS, 1), (3, 672, 112, True, HS, 1)],
        [(5, 672, 160, True, HS, 2), (5, 960, 160, True, HS, 1), (5, 960, 160, True, HS, 1)],
    ],
    last_conv=960,
    num_features=1280,
)
SMALL = dict(
    stages=[
        [(3, 16, 16, True, RE, 2)],
        [(3, 72, 24, False, RE, 2), (3, 88, 24, False, RE, 1)],
        [(5, 96, 40, True, HS, 2), (5, 240, 40, True, HS, 1), (5, 240, 40, True, HS, 1)],
        [(5, 120, 48, True, HS, 1), (5, 144, 48, True, HS, 1)],
        [(5, 288, 96, True, HS, 2), (5, 576, 96, True, HS, 1), (5, 576, 96, True, HS, 1)],
    ],
    last_conv=576,
    num_features=1024,
)
STEM = 16


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of ``divisor`` (at least ``divisor``), bumped up if it lost > 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def _act(kind: str) -> nn.Module:
    return nn.ReLU(inplace=True) if kind == RE else nn.Hardswish(inplace=True)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an optional activation; parameter names are plain BatchNorm's."""

    def __init__(self, channels: int, act: str | None):
        super().__init__(channels)
        self.act = _act(act) if act else nn.Identity()

    def forward(self, x):
        return self.act(super().forward(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite: mean → 1×1 reduce → ReLU → 1×1 expand → hard-sigmoid gate."""

    def __init__(self, channels: int):
        super().__init__()
        rd = make_divisible(channels * 0.25)
        self.conv_reduce = nn.Conv2d(channels, rd, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(s)


class DepthwiseSeparableConv(nn.Module):
    """First bneck (no expansion): dw conv → BN+act → [SE] → 1×1 conv → BN."""

    def __init__(self, cin, cout, k, se, act, stride):
        super().__init__()
        self.has_skip = stride == 1 and cin == cout
        self.conv_dw = nn.Conv2d(cin, cin, k, stride, k // 2, groups=cin, bias=False)
        self.bn1 = BatchNormAct2d(cin, act)
        self.se = SqueezeExcite(cin) if se else nn.Identity()
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = BatchNormAct2d(cout, None)

    def forward(self, x):
        y = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        return x + y if self.has_skip else y


class InvertedResidual(nn.Module):
    """Bneck: 1×1 expand → BN+act → k×k dw conv → BN+act → [SE] → 1×1 linear projection → BN."""

    def __init__(self, cin, mid, cout, k, se, act, stride):
        super().__init__()
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid, act)
        self.conv_dw = nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid, act)
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, None)

    def forward(self, x):
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        y = self.bn3(self.conv_pwl(self.se(y)))
        return x + y if self.has_skip else y


class ConvBnAct(nn.Module):
    """Last stage: 1×1 conv → BN + hard-swish."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn1 = BatchNormAct2d(cout, HS)

    def forward(self, x):
        return self.bn1(self.conv(x))


class MobileNetV3(nn.Module):
    """Stem (3×3 s2 conv, BN, hard-swish) → bneck stages → 1×1 conv stage → efficient head."""

    def __init__(self, cfg: dict, num_classes: int = 1000):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, STEM, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(STEM, HS)
        cin, stages = STEM, []
        for stage in cfg["stages"]:
            blocks = []
            for k, exp, cout, se, act, s in stage:
                if exp == cin:
                    blocks.append(DepthwiseSeparableConv(cin, cout, k, se, act, s))
                else:
                    blocks.append(InvertedResidual(cin, exp, cout, k, se, act, s))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        stages.append(nn.Sequential(ConvBnAct(cin, cfg["last_conv"])))
        self.blocks = nn.Sequential(*stages)
        self.num_classes = num_classes
        self.num_features = cfg["num_features"]
        self.conv_head = nn.Conv2d(cfg["last_conv"], self.num_features, 1, bias=True)
        self.act2 = nn.Hardswish(inplace=True)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.stage_names = [f"blocks.{i}" for i in range(len(stages))]
        # timm's feature_info (features_only's default, all five): where the resolution is about to
        # halve — the stem if the first block has stride 2, and the last block of every stack
        # followed by a stride-2 one — and the last stack (the 1×1 conv stage). Strides 2 to 32.
        firsts = [st[0][-1] for st in cfg["stages"]] + [1]
        taps = [("bn1", STEM)] if firsts[0] == 2 else []
        for i, st in enumerate(cfg["stages"]):
            if firsts[i + 1] > 1:
                taps.append((f"blocks.{i}", st[-1][2]))
        taps.append((f"blocks.{len(stages) - 1}", cfg["last_conv"]))
        strides = [2 * 2 ** k for k in range(len(taps))]
        self.feature_info = [Feature(s, c, m) for s, (m, c) in zip(strides, taps)]
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.weight.shape[0] ** 0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        """Image → the last stage's map (1×1 conv + BN + hard-swish), (B, C, H/32, W/32)."""
        return self.blocks(self.bn1(self.conv_stem(x)))

    def forward_intermediates(self, x, indices):
        """Image → the maps at ``indices`` of ``feature_info`` (strides 2, 4, 8, 16, 32)."""
        x, outs = self.bn1(self.conv_stem(x)), []
        want = {self.feature_info[i].module for i in indices}
        if "bn1" in want:
            outs.append(x)
        last = self.feature_info[max(indices)].module
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if f"blocks.{i}" in want:
                outs.append(x)
            if f"blocks.{i}" == last:
                break
        return outs

    def forward_head(self, x):
        """Map → logits: the "efficient last stage": global average pool, 1×1 conv, hard-swish, Linear."""
        x = x.mean((2, 3), keepdim=True)
        x = self.flatten(self.act2(self.conv_head(x)))
        return self.classifier(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def convert_state_dict(sd: dict) -> dict:
    """Our layout is timm's: pass through (dropping a DataParallel ``module.`` prefix if present)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def infer_kwargs(sd: dict) -> dict:
    """Number of classes from the classifier weight (0 when the checkpoint has no classifier)."""
    w = sd.get("classifier.weight")
    return {"num_classes": int(w.shape[0]) if w is not None else 0}


_META = dict(
    family="MobileNetV3", paper="MobileNetV3 (Howard et al., ICCV 2019)", default_res=224,
    res_multiple=32, min_res=32, convert_state_dict=convert_state_dict, infer_kwargs=infer_kwargs,
    weights_note="timm checkpoints (mobilenetv3_*_100) load as is; timm's miil_in21k weights expect "
    "mean 0 / std 1 inputs; timm's tf_mobilenetv3_* use TF 'same' padding and BN eps 1e-3 (not this model).",
    # timm mobilenetv3.py: _cfg defaults to crop_pct 0.875 / 'bilinear', but the checkpoints this
    # model loads override it: 'mobilenetv3_large_100.ra_in1k' and 'mobilenetv3_small_100.lamb_in1k'
    # are _cfg(interpolation='bicubic', …) → 0.875 bicubic, IMAGENET_DEFAULT_MEAN/STD.
    crop_pct=0.875, interpolation="bicubic",
    preprocess_source="timm mobilenetv3_large_100.ra_in1k / mobilenetv3_small_100.lamb_in1k pretrained cfg "
    "(crop_pct 0.875; interpolation='bicubic' overrides _cfg's bilinear; ImageNet mean/std)",
)


@register_model(paper_params_m=2.5, paper_macs_m=57, paper_top1=67.4, **_META)
def mobilenetv3_small_100(num_classes: int = 1000, **kwargs) -> MobileNetV3:
    """MobileNetV3-Small 1.0 (timm ``mobilenetv3_small_100``)."""
    return MobileNetV3(SMALL, num_classes=num_classes, **kwargs)


@register_model(paper_params_m=5.4, paper_macs_m=217, paper_top1=75.2, **_META,
                params_note="equal to timm's and the official TF model's count; the paper prints it "
                "truncated, not rounded, to one decimal.")
def mobilenetv3_large_100(num_classes: int = 1000, **kwargs) -> MobileNetV3:
    """MobileNetV3-Large 1.0 (timm ``mobilenetv3_large_100``)."""
    return MobileNetV3(LARGE, num_classes=num_classes, **kwargs)
