"""MobileNetV3-Small/Large 1.0: figures, timm's state-dict layout, resolution rules, export."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from helpers import coreml_rel_error, onnx_rel_error, random_state_dict

from edgevit_export.errors import ResolutionError
from edgevit_export.measure import count_macs, count_params, stage_shapes
from edgevit_export.registry import create_model, get_model_info, list_models, parse_resolution

VARIANTS = ["mobilenetv3_small_100", "mobilenetv3_large_100"]
# timm's (and the official TF/Keras models' trainable) parameter counts.
TIMM_PARAMS = {"mobilenetv3_small_100": 2_542_856, "mobilenetv3_large_100": 5_483_032}

# Written from reading timm's mobilenetv3.py / _efficientnet_blocks.py / _efficientnet_builder.py
# (arch strings, make_divisible, SE reduction from the expanded width), not from our model.
TIMM_KEYS = {
    "mobilenetv3_large_100": {
        "conv_stem.weight": (16, 3, 3, 3), "bn1.weight": (16,), "bn1.running_var": (16,),
        "bn1.num_batches_tracked": (),
        "blocks.0.0.conv_dw.weight": (16, 1, 3, 3), "blocks.0.0.bn1.bias": (16,),
        "blocks.0.0.conv_pw.weight": (16, 16, 1, 1), "blocks.0.0.bn2.running_mean": (16,),
        "blocks.1.0.conv_pw.weight": (64, 16, 1, 1), "blocks.1.0.conv_dw.weight": (64, 1, 3, 3),
        "blocks.1.0.bn2.weight": (64,), "blocks.1.0.conv_pwl.weight": (24, 64, 1, 1),
        "blocks.1.0.bn3.weight": (24,), "blocks.1.1.conv_pw.weight": (72, 24, 1, 1),
        "blocks.2.0.conv_dw.weight": (72, 1, 5, 5), "blocks.2.0.se.conv_reduce.weight": (24, 72, 1, 1),
        "blocks.2.0.se.conv_reduce.bias": (24,), "blocks.2.0.se.conv_expand.weight": (72, 24, 1, 1),
        "blocks.2.0.se.conv_expand.bias": (72,), "blocks.2.0.conv_pwl.weight": (40, 72, 1, 1),
        "blocks.2.2.se.conv_reduce.weight": (32, 120, 1, 1),
        "blocks.3.0.conv_pw.weight": (240, 40, 1, 1), "blocks.3.1.conv_pw.weight": (200, 80, 1, 1),
        "blocks.3.2.conv_pw.weight": (184, 80, 1, 1), "blocks.3.3.conv_pwl.weight": (80, 184, 1, 1),
        "blocks.4.0.se.conv_reduce.weight": (120, 480, 1, 1),
        "blocks.4.1.se.conv_expand.weight": (672, 168, 1, 1),
        "blocks.5.0.conv_dw.weight": (672, 1, 5, 5), "blocks.5.2.se.conv_reduce.weight": (240, 960, 1, 1),
        "blocks.5.2.conv_pwl.weight": (160, 960, 1, 1), "blocks.5.2.bn3.running_var": (160,),
        "blocks.6.0.conv.weight": (960, 160, 1, 1), "blocks.6.0.bn1.weight": (960,),
        "conv_head.weight": (1280, 960, 1, 1), "conv_head.bias": (1280,),
        "classifier.weight": (1000, 1280), "classifier.bias": (1000,),
    },
    "mobilenetv3_small_100": {
        "conv_stem.weight": (16, 3, 3, 3), "bn1.bias": (16,),
        "blocks.0.0.conv_dw.weight": (16, 1, 3, 3), "blocks.0.0.se.conv_reduce.weight": (8, 16, 1, 1),
        "blocks.0.0.se.conv_expand.weight": (16, 8, 1, 1), "blocks.0.0.conv_pw.weight": (16, 16, 1, 1),
        "blocks.0.0.bn2.weight": (16,),
        "blocks.1.0.conv_pw.weight": (72, 16, 1, 1), "blocks.1.1.conv_pw.weight": (88, 24, 1, 1),
        "blocks.1.1.conv_pwl.weight": (24, 88, 1, 1),
        "blocks.2.0.conv_pw.weight": (96, 24, 1, 1), "blocks.2.0.conv_dw.weight": (96, 1, 5, 5),
        "blocks.2.0.se.conv_reduce.weight": (24, 96, 1, 1), "blocks.2.1.se.conv_reduce.weight": (64, 240, 1, 1),
        "blocks.3.0.se.conv_reduce.weight": (32, 120, 1, 1), "blocks.3.1.se.conv_reduce.weight": (40, 144, 1, 1),
        "blocks.3.1.conv_pwl.weight": (48, 144, 1, 1),
        "blocks.4.0.se.conv_reduce.weight": (72, 288, 1, 1), "blocks.4.2.se.conv_reduce.weight": (144, 576, 1, 1),
        "blocks.4.2.conv_pwl.weight": (96, 576, 1, 1), "blocks.5.0.conv.weight": (576, 96, 1, 1),
        "blocks.5.0.bn1.running_mean": (576,),
        "conv_head.weight": (1024, 576, 1, 1), "conv_head.bias": (1024,), "classifier.weight": (1000, 1024),
    },
}
# Blocks without squeeze-excite in timm (arch strings without "se0.25").
NO_SE = {"mobilenetv3_large_100": ["blocks.0.0", "blocks.1.0", "blocks.3.0", "blocks.3.3"],
         "mobilenetv3_small_100": ["blocks.1.0", "blocks.1.1"]}
# Stages whose blocks use ReLU ("_nre"); the others (and the stem, last conv, head) hard-swish.
RELU_STAGES = {"mobilenetv3_large_100": 3, "mobilenetv3_small_100": 2}
KEY_RE = re.compile(
    r"^(conv_stem\.weight|bn1\.\w+|conv_head\.(weight|bias)|classifier\.(weight|bias)"
    r"|blocks\.\d+\.\d+\.(conv_pw|conv_dw|conv_pwl|conv|se\.conv_reduce|se\.conv_expand|bn[123])\.\w+)$"
)


def _random_state_dict(name: str, num_classes: int = 1000, seed: int = 3) -> dict[str, torch.Tensor]:
    """A checkpoint in timm's layout: our model's keys (asserted to be timm's below), random values."""
    shapes = [(k, v.shape) for k, v in create_model(name, num_classes=num_classes).state_dict().items()]
    return random_state_dict(shapes, seed=seed, batches_tracked=1000)


def test_registered_with_paper_figures():
    assert set(VARIANTS) <= set(list_models("MobileNetV3"))
    for name, p, macs, top1 in zip(VARIANTS, (2.5, 5.4), (57, 217), (67.4, 75.2)):
        info = get_model_info(name)
        assert (info.default_res, info.paper_params_m, info.paper_macs_m, info.paper_top1) == (224, p, macs, top1)


@pytest.mark.parametrize("name", VARIANTS)
def test_params_and_macs(name):
    info = get_model_info(name)
    model = create_model(name)
    params = count_params(model)
    assert params == TIMM_PARAMS[name]
    # The paper prints params truncated to 0.1M (2.54 -> 2.5, 5.48 -> 5.4; see the model docstring).
    assert info.paper_params_m <= params / 1e6 < info.paper_params_m + 0.1
    macs_m = count_macs(model, (224, 224)) / 1e6
    assert abs(macs_m - info.paper_macs_m) <= 0.01 * info.paper_macs_m
    assert round(macs_m) == info.paper_macs_m


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_layout_is_timms(name):
    sd = {k: tuple(v.shape) for k, v in create_model(name).state_dict().items()}
    for k, shape in TIMM_KEYS[name].items():
        assert sd.get(k) == shape, k
    assert all(KEY_RE.match(k) for k in sd), [k for k in sd if not KEY_RE.match(k)]
    for blk in NO_SE[name]:
        assert not any(k.startswith(blk + ".se.") for k in sd), blk
    assert sum(1 for k in sd if k.endswith("se.conv_reduce.weight")) == (9 if "small" in name else 8)


@pytest.mark.parametrize("name", VARIANTS)
def test_activations_follow_timm(name):
    model = create_model(name)
    assert isinstance(model.bn1.act, nn.Hardswish) and isinstance(model.act2, nn.Hardswish)
    for i, stage in enumerate(model.blocks[:-1]):
        want = nn.ReLU if i < RELU_STAGES[name] else nn.Hardswish
        for blk in stage:
            assert isinstance(blk.bn1.act, want)
            if not isinstance(blk.se, nn.Identity):
                assert isinstance(blk.se.act1, nn.ReLU) and isinstance(blk.se.gate, nn.Hardsigmoid)
    assert isinstance(model.blocks[-1][0].bn1.act, nn.Hardswish)


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_checkpoint_loads_strictly_and_round_trips(name, tmp_path):
    sd = _random_state_dict(name, num_classes=10)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": sd}, path)
    model = create_model(name, weights=str(path))  # num_classes inferred from the classifier
    assert model.classifier.out_features == 10
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 10) and torch.isfinite(y).all()
    path2 = tmp_path / "again.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path2)  # DataParallel-saved
    with torch.no_grad():
        assert torch.equal(create_model(name, weights=str(path2))(x), y)


def test_headless_checkpoint_builds_headless_model(tmp_path):
    sd = _random_state_dict("mobilenetv3_small_100", num_classes=0)
    assert not any(k.startswith("classifier") for k in sd)
    path = tmp_path / "features.pth"
    torch.save(sd, path)
    model = create_model("mobilenetv3_small_100", weights=str(path))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1024)


@pytest.mark.parametrize("res", [224, "224x320", 32, (1024, 64), "512"])
def test_accepted_resolutions_run(res):
    info = get_model_info("mobilenetv3_small_100")
    h, w = parse_resolution(res, info)
    shapes = stage_shapes(create_model("mobilenetv3_small_100"), (h, w))
    assert shapes[-1].shape == (1, 576, h // 32, w // 32)
    assert [s.shape[2] for s in shapes] == [h // d for d in (4, 8, 16, 16, 32, 32)]


@pytest.mark.parametrize("res", [16, 48, 240, 225, "224x200", "0"])
def test_refused_resolutions(res):
    for name in VARIANTS:
        with pytest.raises(ResolutionError):
            parse_resolution(res, get_model_info(name))


def test_onnx_export_parity(tmp_path):
    model = create_model("mobilenetv3_small_100")
    x = torch.randn(1, 3, 224, 224)
    assert onnx_rel_error(model, x, tmp_path / "mnv3.onnx") <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name,res", [(n, 224) for n in VARIANTS] + [("mobilenetv3_large_100", 512)])
def test_coreml_conversion(name, res, tmp_path):
    assert coreml_rel_error(create_model(name), torch.randn(1, 3, res, res), tmp_path / "m.mlpackage") <= 1e-4


def test_hub_safetensors_checkpoint_exports(cli, tmp_path):
    # timm's weights on the Hugging Face hub are `model.safetensors`: a bare timm state dict.
    from safetensors.torch import save_file

    sd = _random_state_dict("mobilenetv3_small_100", num_classes=10)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    model = create_model("mobilenetv3_small_100", weights=str(path))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    renamed = tmp_path / "weights.bin"  # recognised by content, whatever the name
    renamed.write_bytes(path.read_bytes())
    res = cli("export", "mobilenetv3_small_100", "--res", "64", "--weights", renamed, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "PASS parity" in res.output and "randomly initialised" not in res.output
    broken = tmp_path / "cut.safetensors"
    broken.write_bytes(path.read_bytes()[:1000])
    res = cli("export", "mobilenetv3_small_100", "--res", "64", "--weights", broken, "--out", tmp_path / "p")
    assert res.exit_code == 2 and "not a readable .safetensors file" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "p").exists()
