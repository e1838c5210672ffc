"""SHViT S1–S4: faithful to the paper's figures and the official / timm checkpoint layouts."""

import pytest
import torch

from edgevit_export import create_model, get_model_info
from edgevit_export.errors import ResolutionError, WeightsError
from edgevit_export.measure import count_macs, count_params, stage_shapes
from edgevit_export.models.shvit import to_timm_layout
from edgevit_export.registry import parse_resolution
from edgevit_export.weights import randomize_norm_stats


@pytest.mark.parametrize("name", ["shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4"])
def test_params_and_macs_match_paper(name):
    info = get_model_info(name)
    model = create_model(name)
    params_m = count_params(model) / 1e6
    macs_m = count_macs(model, (info.default_res, info.default_res)) / 1e6
    assert abs(params_m - info.paper_params_m) / info.paper_params_m <= 0.01, params_m
    assert abs(macs_m - info.paper_macs_m) / info.paper_macs_m <= 0.01, macs_m


def _trained_like(name, **kw):
    m = create_model(name, **kw)
    randomize_norm_stats(m, seed=3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m.eval()


def test_official_checkpoint_roundtrip(tmp_path):
    src = _trained_like("shvit_s1")
    path = tmp_path / "shvit_s1.pth"
    torch.save({"model": src.state_dict(), "epoch": 300}, path)
    loaded = create_model("shvit_s1", weights=str(path))
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        assert torch.equal(src(x), loaded(x))


def test_timm_layout_loads_into_identical_model(tmp_path):
    src = _trained_like("shvit_s1")
    timm_sd = to_timm_layout(src.state_dict())
    # names as timm's shvit.py builds them (stages.N.downsample.k / stages.N.blocks.j)
    for key in ("stages.0.blocks.0.conv.m.c.weight", "stages.1.downsample.0.m.c.weight",
                "stages.1.downsample.1.m.pw1.c.weight", "stages.1.downsample.2.conv1.c.weight",
                "stages.1.downsample.2.se.fc1.weight", "stages.1.downsample.3.m.bn.running_var",
                "stages.1.downsample.4.m.pw2.bn.weight", "stages.1.blocks.0.mixer.m.qkv.c.weight",
                "stages.2.blocks.4.mixer.m.proj.1.c.weight", "patch_embed.6.bn.bias", "head.l.weight"):
        assert key in timm_sd, key
    assert not any(k.startswith("blocks") for k in timm_sd)
    path = tmp_path / "timm.pth"
    torch.save(timm_sd, path)
    loaded = create_model("shvit_s1", weights=str(path))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(src(x), loaded(x))


def test_distilled_checkpoint_averages_both_heads(tmp_path):
    src = _trained_like("shvit_s1", distilled=True)
    path = tmp_path / "dist.pth"
    torch.save({"model": src.state_dict()}, path)
    loaded = create_model("shvit_s1", weights=str(path))  # detected from head_dist.* keys
    assert loaded.distillation
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = torch.nn.functional.adaptive_avg_pool2d(
            loaded.blocks3(loaded.blocks2(loaded.blocks1(loaded.patch_embed(x)))), 1).flatten(1)
        expected = (loaded.head(feats) + loaded.head_dist(feats)) / 2
        assert torch.allclose(loaded(x), expected, atol=1e-6)
        assert torch.equal(loaded(x), src(x))


def test_headless_checkpoint_builds_headless_model(tmp_path):
    # As the official code: num_classes=0 builds no head, and the pooled stage-3 features come out.
    src = _trained_like("shvit_s1", num_classes=0)
    assert not any(k.startswith("head") for k in src.state_dict())
    path = tmp_path / "features.pth"
    torch.save({"model": src.state_dict()}, path)
    loaded = create_model("shvit_s1", weights=str(path))
    assert loaded.num_classes == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert loaded(x).shape == (1, 320)
        assert torch.equal(loaded(x), src(x))


def test_official_se_weights_stored_as_matrices_load(tmp_path):
    src = _trained_like("shvit_s1")
    sd = {k: (v[:, :, 0, 0] if ".se.fc" in k and k.endswith("weight") else v) for k, v in src.state_dict().items()}
    path = tmp_path / "old.pth"
    torch.save({"model": sd}, path)
    loaded = create_model("shvit_s1", weights=str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), loaded(x))


def test_mismatched_checkpoint_names_keys(tmp_path):
    path = tmp_path / "s2.pth"
    torch.save({"model": create_model("shvit_s2").state_dict()}, path)
    with pytest.raises(WeightsError) as e:
        create_model("shvit_s1", weights=str(path))
    msg = str(e.value)
    assert "wrong shape" in msg and "shvit_s1" in msg and "\n" not in msg

    sd = create_model("shvit_s1").state_dict()
    del sd["head.l.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"1 missing \(head\.l\.bias\); 1 unexpected \(extra\.weight\)"):
        create_model("shvit_s1", weights=str(path))


def test_resolution_rules_and_stage_shapes():
    info = get_model_info("shvit_s4")
    assert parse_resolution("768x1024", info) == (768, 1024)
    for bad in ("0", "-64", "100", "abc", "32"):
        with pytest.raises(ResolutionError):
            parse_resolution(bad, info)
    shapes = stage_shapes(create_model("shvit_s4"), (1024, 1024))
    assert [s.shape for s in shapes] == [(1, 224, 64, 64), (1, 224, 64, 64), (1, 336, 32, 32), (1, 448, 16, 16)]
    assert shapes[-1].tokens == 256
