"""EfficientFormer-L1 / EfficientFormerV2-S1: timm layout, figures, position bias, resolutions, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import coreml_rel_error, onnx_rel_error

from edgevit_export.errors import ResolutionError
from edgevit_export.measure import count_macs, count_params
from edgevit_export.models import efficientformer as ef
from edgevit_export.registry import create_model, get_model_info, parse_resolution

VARIANTS = ["efficientformer_l1", "efficientformerv2_s1"]
TIMM_PARAMS_M = {"efficientformer_l1": 12.29, "efficientformerv2_s1": 6.19}  # timm model cards

# Key names and shapes read from timm/models/efficientformer.py.
TIMM_KEYS_L1 = {
    "stem.conv1.weight": (24, 3, 3, 3),
    "stem.conv1.bias": (24,),
    "stem.norm1.weight": (24,),
    "stem.conv2.weight": (48, 24, 3, 3),
    "stem.norm2.running_var": (48,),
    "stages.0.blocks.0.ls1.gamma": (48,),
    "stages.0.blocks.0.mlp.fc1.weight": (192, 48, 1, 1),
    "stages.0.blocks.0.mlp.norm1.weight": (192,),
    "stages.0.blocks.0.mlp.fc2.weight": (48, 192, 1, 1),
    "stages.0.blocks.0.mlp.norm2.bias": (48,),
    "stages.0.blocks.2.ls2.gamma": (48,),
    "stages.1.downsample.conv.weight": (96, 48, 3, 3),
    "stages.1.downsample.conv.bias": (96,),
    "stages.1.downsample.norm.weight": (96,),
    "stages.2.blocks.5.mlp.fc1.weight": (896, 224, 1, 1),
    "stages.3.downsample.conv.weight": (448, 224, 3, 3),
    "stages.3.blocks.2.mlp.fc1.weight": (1792, 448, 1, 1),
    "stages.3.blocks.4.norm1.weight": (448,),
    "stages.3.blocks.4.token_mixer.qkv.weight": (1536, 448),
    "stages.3.blocks.4.token_mixer.qkv.bias": (1536,),
    "stages.3.blocks.4.token_mixer.proj.weight": (448, 1024),
    "stages.3.blocks.4.token_mixer.attention_biases": (8, 49),
    "stages.3.blocks.4.token_mixer.attention_bias_idxs": (49, 49),  # a persistent buffer in timm's V1
    "stages.3.blocks.4.norm2.bias": (448,),
    "stages.3.blocks.4.mlp.fc1.weight": (1792, 448),
    "stages.3.blocks.4.mlp.fc2.weight": (448, 1792),
    "stages.3.blocks.4.ls1.gamma": (448,),
    "stages.3.blocks.4.ls2.gamma": (448,),
    "norm.weight": (448,),
    "head.weight": (1000, 448),
    "head.bias": (1000,),
    "head_dist.weight": (1000, 448),
    "head_dist.bias": (1000,),
}
NOT_TIMM_KEYS_L1 = ["stages.0.downsample.conv.weight", "stages.3.blocks.3.norm1.weight", "head.fc.weight"]
# Key names and shapes read from timm/models/efficientformer_v2.py.
TIMM_KEYS_V2_S1 = {
    "stem.conv1.conv.weight": (16, 3, 3, 3),
    "stem.conv1.conv.bias": (16,),
    "stem.conv1.bn.weight": (16,),
    "stem.conv2.conv.weight": (32, 16, 3, 3),
    "stages.0.blocks.0.mlp.fc1.conv.weight": (128, 32, 1, 1),
    "stages.0.blocks.0.mlp.fc1.bn.weight": (128,),
    "stages.0.blocks.0.mlp.mid.conv.weight": (128, 1, 3, 3),
    "stages.0.blocks.0.mlp.mid.conv.bias": (128,),
    "stages.0.blocks.0.mlp.fc2.conv.weight": (32, 128, 1, 1),
    "stages.0.blocks.0.mlp.fc2.bn.running_mean": (32,),
    "stages.0.blocks.0.ls2.gamma": (32,),
    "stages.1.downsample.conv.conv.weight": (48, 32, 3, 3),
    "stages.1.downsample.conv.bn.weight": (48,),
    "stages.2.blocks.2.mlp.fc1.conv.weight": (360, 120, 1, 1),
    "stages.2.blocks.7.token_mixer.stride_conv.conv.weight": (120, 1, 3, 3),
    "stages.2.blocks.7.token_mixer.q.conv.weight": (256, 120, 1, 1),
    "stages.2.blocks.7.token_mixer.k.conv.weight": (256, 120, 1, 1),
    "stages.2.blocks.7.token_mixer.v.conv.weight": (1024, 120, 1, 1),
    "stages.2.blocks.7.token_mixer.v_local.conv.weight": (1024, 1, 3, 3),
    "stages.2.blocks.7.token_mixer.talking_head1.weight": (8, 8, 1, 1),
    "stages.2.blocks.7.token_mixer.talking_head2.bias": (8,),
    "stages.2.blocks.7.token_mixer.proj.conv.weight": (120, 1024, 1, 1),
    "stages.2.blocks.8.token_mixer.proj.bn.weight": (120,),
    "stages.2.blocks.8.token_mixer.attention_biases": (8, 49),
    "stages.2.blocks.8.ls1.gamma": (120,),
    "stages.3.downsample.conv.conv.weight": (224, 120, 3, 3),
    "stages.3.downsample.attn.q.local.weight": (120, 1, 3, 3),
    "stages.3.downsample.attn.q.local.bias": (120,),
    "stages.3.downsample.attn.q.proj.conv.weight": (128, 120, 1, 1),
    "stages.3.downsample.attn.k.conv.weight": (128, 120, 1, 1),
    "stages.3.downsample.attn.v.conv.weight": (512, 120, 1, 1),
    "stages.3.downsample.attn.v_local.conv.weight": (512, 1, 3, 3),
    "stages.3.downsample.attn.proj.conv.weight": (224, 512, 1, 1),
    "stages.3.downsample.attn.attention_biases": (8, 196),
    "stages.3.blocks.2.mlp.fc1.conv.weight": (672, 224, 1, 1),
    "stages.3.blocks.4.token_mixer.q.conv.weight": (256, 224, 1, 1),
    "stages.3.blocks.5.token_mixer.attention_biases": (8, 49),
    "norm.running_var": (224,),
    "head.weight": (1000, 224),
    "head_dist.weight": (1000, 224),
}
NOT_TIMM_KEYS_V2_S1 = [
    "stages.2.blocks.6.token_mixer.q.conv.weight",  # only the last num_vit=2 blocks attend
    "stages.3.blocks.4.token_mixer.stride_conv.conv.weight",  # stride attention only in stage 3
    "stages.2.downsample.attn.k.conv.weight",  # attention downsampling only into stage 4
    "stages.2.blocks.8.token_mixer.attention_bias_idxs",  # non-persistent in timm's V2
    "stages.3.downsample.attn.attention_bias_idxs",
    "stem.conv1.weight",
]


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.normal_(0, 1.0, generator=g)
            elif name.endswith("gamma"):
                p.normal_(0, 0.3, generator=g)
    return model.eval()


def _bn_folded_params(model: torch.nn.Module) -> int:
    bn = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    return count_params(model) - bn


@pytest.mark.parametrize("name", VARIANTS)
def test_params_and_macs(name):
    model = create_model(name)
    info = get_model_info(name)
    params = count_params(model)
    assert abs(params / 1e6 - TIMM_PARAMS_M[name]) / TIMM_PARAMS_M[name] < 0.01
    # The papers count parameters with BatchNorm folded into the convs (see the module docstring);
    # V1 matches either way, V2-S1's 6.1M only that way.
    assert abs(_bn_folded_params(model) / 1e6 - info.paper_params_m) / info.paper_params_m < 0.01
    macs = count_macs(model, (224, 224))
    assert abs(macs / 1e6 - info.paper_macs_m) / info.paper_macs_m < 0.01, macs


@pytest.mark.parametrize("name,keys,absent", [
    ("efficientformer_l1", TIMM_KEYS_L1, NOT_TIMM_KEYS_L1),
    ("efficientformerv2_s1", TIMM_KEYS_V2_S1, NOT_TIMM_KEYS_V2_S1),
])
def test_state_dict_has_timm_names_and_shapes(name, keys, absent):
    sd = create_model(name).state_dict()
    for k, shape in keys.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape), shape)
    for k in absent:
        assert k not in sd, k
    idx = [k for k in sd if k.endswith("attention_bias_idxs")]
    assert idx == (["stages.3.blocks.4.token_mixer.attention_bias_idxs"] if name == "efficientformer_l1" else [])


def test_v1_bias_index_buffer_is_timms():
    """timm: idx[i, j] = |yi − yj|·7 + |xi − xj| over the row-major 7×7 grid."""
    sd = create_model("efficientformer_l1").state_dict()
    idx = sd["stages.3.blocks.4.token_mixer.attention_bias_idxs"]
    assert idx.dtype == torch.int64
    ys, xs = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    expected = (ys[:, None] - ys[None]).abs() * 7 + (xs[:, None] - xs[None]).abs()
    assert torch.equal(idx, expected)


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_checkpoint_loads_strictly_and_reproduces_outputs(name, tmp_path):
    src = _randomise(create_model(name, seed=1), seed=2)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": src.state_dict()}, path)
    assert ef.convert_state_dict(src.state_dict()).keys() == src.state_dict().keys()
    loaded = create_model(name, weights=str(path))
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)


def test_head_options_inferred_from_checkpoint(tmp_path):
    # distillation head averaged with the main head at inference
    model = _randomise(create_model("efficientformerv2_s1"))
    with torch.no_grad():
        model.head_dist.weight.normal_()
        x = torch.randn(1, 3, 128, 128)
        feats = model.forward_features(x).mean((2, 3))
        torch.testing.assert_close(model(x), (model.head(feats) + model.head_dist(feats)) / 2)
    # no head_dist in the checkpoint → built without it; class count from the head
    sd = create_model("efficientformer_l1", num_classes=10, distilled=False).state_dict()
    path = tmp_path / "l1_plain.pth"
    torch.save(sd, path)
    loaded = create_model("efficientformer_l1", weights=str(path))
    assert loaded.head_dist is None
    assert loaded(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    # a V2 checkpoint built by timm for img_size=256 has larger bias tables: inferred and loaded
    sd = create_model("efficientformerv2_s1", img_size=256).state_dict()
    assert tuple(sd["stages.3.downsample.attn.attention_biases"].shape) == (8, 256)
    path = tmp_path / "v2_256.pth"
    torch.save(sd, path)
    assert create_model("efficientformerv2_s1", weights=str(path)).stages[3].downsample.attn.bias_res == (16, 16)


def _reference_bias(table: torch.Tensor, res: int, kh: int, kw: int, q_stride: int) -> torch.Tensor:
    """Bias for a kh×kw key grid, written independently: bicubic-resize the (|Δy|, |Δx|) table
    with F.interpolate, then look up every (query, key) pair by its 2-D offset."""
    t = table.reshape(1, -1, res, res)
    if (kh, kw) != (res, res):
        t = F.interpolate(t, size=(kh, kw), mode="bicubic", align_corners=False)
    qy, qx = torch.meshgrid(torch.arange(0, kh, q_stride), torch.arange(0, kw, q_stride), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()
    return t[0][:, dy, dx]


@pytest.fixture(scope="module")
def models():
    return {name: _randomise(create_model(name)) for name in VARIANTS}


@pytest.mark.parametrize("where,res,q_stride", [
    ("v1", 7, 1), ("v2_block", 7, 1), ("v2_down", 14, 2),
])
@pytest.mark.parametrize("grid", [None, (16, 16), (10, 6), (4, 4)])
def test_position_bias_rule(models, where, res, q_stride, grid):
    """Exact timm gather on the training grid; bicubic resampling of the offset table elsewhere."""
    if where == "v1":
        attn = models["efficientformer_l1"].stages[3].blocks[4].token_mixer
    elif where == "v2_block":
        attn = models["efficientformerv2_s1"].stages[3].blocks[5].token_mixer
    else:
        attn = models["efficientformerv2_s1"].stages[3].downsample.attn
        grid = None if grid is None else (2 * grid[0], 2 * grid[1])
    kh, kw = grid or (res, res)
    with torch.no_grad():
        got = attn.position_bias((kh, kw))
        torch.testing.assert_close(got, _reference_bias(attn.attention_biases, res, kh, kw, q_stride),
                                   rtol=1e-5, atol=1e-5)
        if grid is None:
            assert torch.equal(got, attn.attention_biases[:, attn.attention_bias_idxs])


@pytest.mark.parametrize("name", VARIANTS)
def test_resolution_rules(models, name):
    info = get_model_info(name)
    assert parse_resolution(None, info) == (224, 224)
    assert parse_resolution("512x768", info) == (512, 768)
    for bad in (240, 32, "224x100", (0, 224)):
        with pytest.raises(ResolutionError):
            parse_resolution(bad, info)
    model = models[name]
    with torch.no_grad():
        for res in [(64, 64), (160, 96)]:
            y = model(torch.randn(1, 3, *res))
            assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_onnx_parity_smallest_at_default_res(tmp_path):
    model = _randomise(create_model("efficientformerv2_s1"), seed=4)
    x = torch.randn(1, 3, 224, 224)
    assert onnx_rel_error(model, x, tmp_path / "efficientformerv2_s1.onnx") < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("res", [224, 512])
def test_onnx_parity_l1(tmp_path, res):
    """V1 at 224 and at 512, where the stage-4 position bias is resampled."""
    model = _randomise(create_model("efficientformer_l1"), seed=4)
    x = torch.randn(1, 3, res, res)
    assert onnx_rel_error(model, x, tmp_path / "efficientformer_l1.onnx") < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("res", [224, 512])
def test_coreml_conversion(name, res, tmp_path):
    model = _randomise(create_model(name), seed=4)
    assert coreml_rel_error(model, torch.randn(1, 3, res, res), tmp_path / "m.mlpackage") <= 1e-4
