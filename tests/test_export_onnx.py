"""`edgevit-export export … --format onnx`: artifact, manifest, parity, and every bad input."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from edgevit_export import api, create_model
from edgevit_export.registry import get_model_info, list_models


@pytest.fixture(scope="module")
def s1_export(onnx_s1_64):
    return onnx_s1_64, onnx_s1_64.artifact.parent


def test_export_writes_artifact_and_manifest(s1_export):
    r, out = s1_export
    assert r.artifact == out / "shvit_s1-64.onnx" and r.artifact.is_file()
    m = json.loads((out / "shvit_s1-64.json").read_text())
    assert m["model"] == "shvit_s1" and m["resolution"] == [64, 64] and m["random_init"] is True
    assert m["checks"]["parity"]["passed"] and m["checks"]["parity"]["max_rel"] <= 1e-4
    assert [p["name"] for p in m["passes"]] == ["static_shapes", "fold_batchnorm", "rank_le5", "cancel_reshapes"]
    assert m["io"]["inputs"][0]["name"] == "images" and m["io"]["inputs"][0]["shape"] == [1, 3, 64, 64]
    assert len(m["sha256"]) == 64 and m["tools"]["torch"].startswith("2.")
    assert not list(out.glob(".edgevit-tmp-*"))


def test_onnx_matches_pytorch_on_fresh_input(s1_export):
    """Independent of the built-in check: run the file in onnxruntime against the same model."""
    from edgevit_export.ort import session
    from edgevit_export.weights import calibrate_norm_stats, randomize_norm_stats

    r, _ = s1_export
    model = create_model("shvit_s1")
    randomize_norm_stats(model, 0)
    calibrate_norm_stats(model, (64, 64), 0)  # as export does without --weights
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(99))
    y = session(r.artifact).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("name", ["shvit_s1", "efficientvit_m0", "mobilenetv3_small_100", "fastvit_t8"])
def test_random_init_output_depends_on_the_input(name):
    """Without --weights the parity checks run on a random network; with random norm statistics
    these nets' logits barely depend on the image (SHViT-S1: 0.08% of the output), which would
    make the checks compare constants. Calibrated statistics make the image matter."""
    _, _, model, random_init = api.prepare_model(name, 64, None, None)
    assert random_init and not model.training
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.1 for m in bns)  # calibration leaves the layers as it found them
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ys = torch.cat([model(torch.randn(1, 3, 64, 64, generator=g)) for _ in range(4)])
    varying = (ys - ys.mean(0)).abs().max() / ys.abs().max()
    assert varying > 0.1, f"only {varying:.2%} of the output depends on the input"


def test_passes_reduce_reshapes_and_bn(s1_export):
    r, _ = s1_export
    before, after = r.manifest["graph"]["before"], r.manifest["graph"]["after"]     # the capture's op counts
    assert after["reshape"] < before["reshape"]
    assert after["by_op"].get("batch_norm", 0) == 0 < before["by_op"]["batch_norm"]


def test_cli_export_and_existing_file_needs_force(cli, tmp_path):
    res = cli("export", "shvit_s1", "--res", "64", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert "randomly initialised" in res.output and "PASS parity" in res.output
    again = cli("export", "shvit_s1", "--res", "64", "--out", tmp_path)
    assert again.exit_code == 2 and "--force" in again.output
    # --force replaces it; --labels takes back the labels file an export ships (ImageNet-1k's names
    # 'crane' twice: a classifier's names may repeat)
    shipped = tmp_path / "shipped.labels.txt"
    shutil.copy(tmp_path / "shvit_s1-64.labels.txt", shipped)
    assert cli("export", "shvit_s1", "--res", "64", "--out", tmp_path, "--force", "--no-check",
               "--passes", "none", "--labels", shipped).exit_code == 0
    m = json.loads((tmp_path / "shvit_s1-64.json").read_text())
    assert m["labels"]["source"] == f"--labels {shipped}"
    assert (tmp_path / "shvit_s1-64.labels.txt").read_text() == shipped.read_text()


def test_failed_parity_exits_1_and_keeps_artifact(cli, tmp_path, monkeypatch):
    from edgevit_export.exporters import onnx as onnx_format

    monkeypatch.setattr(onnx_format, "TOLERANCE", 0.0)
    res = cli("export", "shvit_s1", "--res", "64", "--out", tmp_path, "--passes", "none")
    assert res.exit_code == 1, res.output
    assert "parity" in res.output and (tmp_path / "shvit_s1-64.onnx").exists()


def _no_files(d):
    return not d.exists() or not any(d.iterdir())


@pytest.mark.parametrize("args, message", [
    (["shvit_s9"], "Did you mean"),
    (["shvit_s1", "--res", "0"], "positive"),
    (["shvit_s1", "--res", "100"], "multiples of 16"),
    (["shvit_s1", "--res", "big"], "not a number"),
    (["shvit_s1", "--format", "tfl"], "unknown format"),
    (["shvit_s1", "--passes", "fold_everything"], "unknown pass"),
    (["shvit_s1", "--weights", "missing.pth"], "not found"),
])
def test_bad_input_one_line_exit_2(cli, tmp_path, args, message):
    out = tmp_path / "out"
    res = cli("export", *args, "--out", out)
    assert res.exit_code == 2, res.output
    err = res.output.strip().splitlines()[-1]
    assert err.startswith("error:") and message in res.output
    assert "Traceback" not in res.output
    assert _no_files(out)


def test_bad_weights_exit_2(cli, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    res = cli("export", "shvit_s1", "--res", "64", "--weights", junk, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "not a readable PyTorch checkpoint" in res.output
    other = tmp_path / "s2.pth"
    torch.save({"model": create_model("shvit_s2").state_dict()}, other)
    res = cli("export", "shvit_s1", "--res", "64", "--weights", other, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "does not fit shvit_s1" in res.output and "wrong shape" in res.output
    assert not (tmp_path / "o").exists()  # not even an empty output directory


def test_unwritable_out_exit_2(cli, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    res = cli("export", "shvit_s1", "--res", "64", "--out", f)
    assert res.exit_code == 2 and "not a directory" in res.output
    res = cli("export", "shvit_s1", "--res", "64", "--out", f / "sub" / "dir")
    assert res.exit_code == 2 and "cannot create output directory" in res.output and "not a directory" in res.output


def test_list_and_info(cli):
    res = cli("list")
    assert res.exit_code == 0
    for name in ("shvit_s1", "shvit_s4", "litv2_s", "edgevit_xxs"):
        assert name in res.output
    res = cli("info", "shvit_s4", "--res", "1024")
    assert res.exit_code == 0 and "1×224×64×64" in res.output and "1×448×16×16" in res.output
    assert cli("info", "nope").exit_code == 2


def test_paper_params_gaps_are_flagged_and_explained(cli):
    # The paper prints 2.3M for 2.349M (rounding) and 5.4M for 5.483M (truncation, 1.5%).
    info = dataclasses.replace(get_model_info("efficientvit_m0"), paper_params_m=2.3)
    assert info.params_agree(2_349_000) and not info.params_agree(2_360_000)
    assert not dataclasses.replace(info, paper_params_m=5.4).params_agree(5_483_032)
    assert dataclasses.replace(info, paper_params_m=28).params_agree(27_844_000)  # printed "28M"
    # Every disagreement with a paper says why, and no agreeing model carries a stale excuse.
    for name in list_models():
        s = api.summarize(name)
        assert s.params_agree == (not s.params_note), name
        if "truncated, not rounded" in s.params_note:  # the claim holds for the measured count
            assert math.floor(s.params / 1e5) / 10 == s.paper_params_m != round(s.params / 1e6, 1), name
    listing = cli("list", "--family", "FastViT").output
    assert "4.03 †" in listing and "'edgevit-export info MODEL' says why" in listing
    assert "†" not in cli("list", "--family", "SHViT").output
    s = api.summarize("fastvit_t8")
    delta = f"{s.params / 1e6 / s.paper_params_m - 1:+.1%}"
    assert f"params vs paper: {delta} — timm's train-time model" in " ".join(cli("info", "fastvit_t8").output.split())
