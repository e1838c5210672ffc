"""Backbone exports (``export --features``): the feature maps detection and segmentation heads take."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgevit_export.features import Backbone, select
from edgevit_export.registry import create_model, get_model_info, list_models

# timm's feature_info (num_chs per stride) for the models timm has, as huggingface/pytorch-image-models
# defines them (shvit.py, fastvit.py, efficientformer.py, efficientformer_v2.py, efficientvit_msra.py,
# mobilenetv3.py): our outputs must be the same maps, so the same channels at the same strides.
TIMM_CHANNELS = {
    "shvit_s1": {16: 128, 32: 224, 64: 320}, "shvit_s2": {16: 128, 32: 308, 64: 448},
    "shvit_s3": {16: 192, 32: 352, 64: 448}, "shvit_s4": {16: 224, 32: 336, 64: 448},
    "fastvit_t8": {4: 48, 8: 96, 16: 192, 32: 384}, "fastvit_t12": {4: 64, 8: 128, 16: 256, 32: 512},
    "fastvit_sa12": {4: 64, 8: 128, 16: 256, 32: 512},
    "efficientformer_l1": {4: 48, 8: 96, 16: 224, 32: 448},
    "efficientformerv2_s1": {4: 32, 8: 48, 16: 120, 32: 224},
    "efficientvit_m0": {16: 64, 32: 128, 64: 192}, "efficientvit_m1": {16: 128, 32: 144, 64: 192},
    "efficientvit_m2": {16: 128, 32: 192, 64: 224}, "efficientvit_m3": {16: 128, 32: 240, 64: 320},
    "efficientvit_m4": {16: 128, 32: 256, 64: 384}, "efficientvit_m5": {16: 192, 32: 288, 64: 384},
    "mobilenetv3_small_100": {2: 16, 4: 16, 8: 24, 16: 48, 32: 576},
    "mobilenetv3_large_100": {2: 16, 4: 24, 8: 40, 16: 112, 32: 960},
    # not in timm: the official detection backbone (LITv2) and the stage outputs (EdgeViT)
    "litv2_s": {4: 96, 8: 192, 16: 384, 32: 768}, "litv2_b": {4: 128, 8: 256, 16: 512, 32: 1024},
    "edgevit_xxs": {4: 36, 8: 72, 16: 144, 32: 288}, "edgevit_s": {4: 48, 8: 96, 16: 240, 32: 384},
}


def _res(info) -> tuple[int, int]:
    """A small non-square size the model takes (catches an H/W mix-up)."""
    r = max(64, -(-info.min_res // info.res_multiple) * info.res_multiple)
    return r, r + 2 * info.res_multiple


def _hooked(model, x, modules):
    """forward_intermediates(x, all) with the output of each named module recorded."""
    seen, hooks = {}, []
    for name in modules:
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda _m, _i, o, name=name: seen.setdefault(name, o[0] if isinstance(o, (tuple, list)) else o)))
    try:
        outs = model.forward_intermediates(x, list(range(len(model.feature_info))))
    finally:
        for h in hooks:
            h.remove()
    return outs, seen


@pytest.mark.parametrize("name", list_models())
def test_feature_contract(name):
    info = get_model_info(name)
    model = create_model(name)
    fi = model.feature_info
    h, w = _res(info)
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs, seen = _hooked(model, x, [f.module for f in fi])
        deepest = model.forward_intermediates(x, [len(fi) - 1])
        middle = model.forward_intermediates(x, [1])
    strides = [f.stride for f in fi]
    assert len(fi) >= 3 and strides == sorted(set(strides)), strides
    if name in TIMM_CHANNELS:
        assert {f.stride: f.channels for f in fi} == TIMM_CHANNELS[name]
    for f, o in zip(fi, outs):
        assert tuple(o.shape) == (2, f.channels, -(-h // f.stride), -(-w // f.stride)), (f.name, o.shape)
        ref = seen[f.module]
        if ref.dim() == 3:   # a token stage: (B, h·w, C)
            if f.norm:
                ref = F.layer_norm(ref, ref.shape[-1:])
            ref = ref.transpose(1, 2).reshape(o.shape)
        else:
            assert not f.norm
        assert torch.equal(o, ref), f"{f.name} is not the output of {f.module}"
    # a subset computes the same maps, and only as deep as it must
    assert len(deepest) == 1 and torch.equal(deepest[0], outs[-1])
    assert len(middle) == 1 and torch.equal(middle[0], outs[1])


def test_select_names_and_refusals():
    model = create_model("shvit_s1")
    assert select(model, None) == [0, 1, 2] == select(model, "all")
    assert select(model, "s64,feat_s16") == [0, 2]
    with pytest.raises(Exception, match="no 's8' output; it has s16, s32, s64"):
        select(model, "s8")


def test_backbone_drops_the_head_params():
    model = create_model("shvit_s1")
    b = Backbone(model, [0, 1, 2])
    with torch.no_grad():
        outs = b(torch.randn(1, 3, 128, 128))
    assert [tuple(o.shape[1:]) for o in outs] == [(128, 8, 8), (224, 4, 4), (320, 2, 2)]
    assert b.output_names == ["feat_s16", "feat_s32", "feat_s64"]


def test_export_features_onnx_subset_and_check(cli, tmp_path):
    """A backbone export: outputs named by stride, each checked on its own scale; the golden file and
    ``check --weights`` compare the same outputs."""
    ckpt = tmp_path / "w.pth"
    torch.save(create_model("shvit_s1").state_dict(), ckpt)
    r = cli("export", "shvit_s1", "--features", "s32,s64", "--res", "128x192", "--weights", ckpt,
            "--out", tmp_path)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "shvit_s1-128x192.json").read_text())
    assert m["task"] == "features"
    assert [o["name"] for o in m["io"]["outputs"]] == ["feat_s32", "feat_s64"]
    assert [o["shape"] for o in m["io"]["outputs"]] == [[1, 224, 4, 6], [1, 320, 2, 3]]
    assert [f["stride"] for f in m["features"]] == [32, 64]
    p = m["checks"]["parity"]
    assert p["passed"] and set(p["outputs"]) == {"feat_s32", "feat_s64"}
    assert all(o["max_rel"] <= 1e-4 for o in p["outputs"].values())
    # the head's parameters are not the backbone's
    assert m["params"] < sum(v.numel() for v in torch.load(ckpt, weights_only=True).values())
    golden = np.load(tmp_path / "shvit_s1-128x192.golden.npz")
    assert sorted(k for k in golden.files if k.startswith("output:")) == ["output:feat_s32", "output:feat_s64"]
    for extra in ([], ["--weights", ckpt]):
        r = cli("check", tmp_path / "shvit_s1-128x192.onnx", *extra)
        assert r.exit_code == 0 and "feat_s64: max rel" in r.output, r.output
    # the parity is per output: one golden map 1% off (far above 1e-4) fails the check, and names it
    arrays = {k: golden[k] for k in golden.files}
    arrays["output:feat_s32"] = arrays["output:feat_s32"] * 1.01
    np.savez_compressed(tmp_path / "shvit_s1-128x192.golden.npz", **arrays)
    r = cli("check", tmp_path / "shvit_s1-128x192.onnx")
    assert r.exit_code == 1 and "worst feat_s32" in r.output, r.output
    # accuracy commands take classifiers: a backbone is refused in one line
    for cmd in (["quantize", "--calib", "synthetic"], ["evaluate", "--data", tmp_path]):
        r = cli(cmd[0], tmp_path / "shvit_s1-128x192.onnx", *cmd[1:])
        assert r.exit_code == 2 and "not class scores (a --features backbone export)" in r.output, r.output


@pytest.mark.parametrize("fmt", [pytest.param("coreml", marks=pytest.mark.slow),   # ~30 s each
                                 pytest.param("tflite", marks=pytest.mark.slow),
                                 pytest.param("pte", marks=pytest.mark.slow)])
def test_export_features_other_formats(cli, tmp_path, fmt):
    """Core ML (image input, tensor outputs, fp32 in the runner) and LiteRT carry the same named outputs."""
    extra = ["--precision", "fp32"] if fmt == "coreml" else []
    r = cli("export", "shvit_s1", "--features", "--format", fmt, "--res", "128x192", *extra,
            "--out", tmp_path)
    assert r.exit_code == 0, r.output
    stem = {"coreml": ".coreml", "tflite": ".tflite", "pte": ".pte"}[fmt]
    m = json.loads((tmp_path / f"shvit_s1-128x192{stem}.json").read_text())
    assert [o["name"] for o in m["io"]["outputs"]] == ["feat_s16", "feat_s32", "feat_s64"]
    p = m["checks"]["parity"]
    assert p["passed"] and p["gated"] and p["max_rel"] <= 1e-4, p
    assert m["checks"]["structure"]["passed"], m["checks"]["structure"]


@pytest.mark.parametrize("args, message", [
    (["shvit_s1", "--features", "s8"], "no 's8' output; it has s16, s32, s64"),
    (["shvit_s1", "--features", "--format", "coreml", "--labels", "LABELS"], "a --features export has no classifier"),
    (["shvit_s4", "--features", "--res", "1000x1333"], "nearest: 992x1328 or 1008x1344"),
    (["litv2_s", "--res", "1000x1333"], "nearest: 992x1312 or 1024x1344"),   # the classifier does not pad
])
def test_features_bad_input(cli, tmp_path, args, message):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    r = cli("export", *[str(labels) if a == "LABELS" else a for a in args], "--out", tmp_path / "out")
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_info_lists_the_backbone_outputs(cli):
    r = cli("info", "litv2_s", "--res", "768x1344")
    assert r.exit_code == 0, r.output
    assert "feat_s4" in r.output and "96×192×336" in r.output and "24×42" in r.output


@pytest.mark.slow   # the padding itself is checked in the fast tier by test_litv2.py::test_resolution_rules
def test_litv2_backbone_pads_as_its_detection_code(cli, tmp_path):
    """LITv2's detection backbone takes any size: the image padded to a multiple of 4, each HiLo map to
    whole windows (cropped back), odd maps floored by DTM; the export says so and matches PyTorch."""
    r = cli("export", "litv2_s", "--features", "--res", "88x120", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert "not a multiple of what litv2_s takes: padded as LITv2's detection backbone pads" in r.output
    m = json.loads((tmp_path / "litv2_s-88x120.json").read_text())
    assert [o["shape"][2:] for o in m["io"]["outputs"]] == [[22, 30], [11, 15], [5, 7], [2, 3]]
    assert m["padding"] and m["checks"]["parity"]["passed"]
    assert m["checks"]["parity"]["max_rel"] <= 1e-4
