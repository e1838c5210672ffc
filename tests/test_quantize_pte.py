"""int8 ExecuTorch: `quantize --format pte` on the trained shapes classifier (see test_quantize.py's
`trained` fixture): PT2E with XNNPACK's quantizer, lowered into one XNNPACK delegate, the accuracy
drop measured on the saved .pte in ExecuTorch's runtime."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

THREADS = "1"


@pytest.fixture(scope="session")
def pte_int8(trained, tmp_path_factory):
    from typer.testing import CliRunner

    from edgevit_export.cli import app

    out = tmp_path_factory.mktemp("int8-pte")
    res = CliRunner().invoke(app, [str(a) for a in (
        "quantize", "shvit_s1", "--res", 64, "--weights", trained.ckpt, "--format", "pte", "--calib", trained.calib,
        "--calib-size", 32, "--eval", trained.test, "--eval-size", 200, "--max-drop", 1.0, "--sensitivity", 8, "--out", out,
        "--threads", THREADS)])
    path = out / "shvit_s1-64.int8.pte.json"
    return SimpleNamespace(res=res, out=out, artifact=out / "shvit_s1-64.int8.pte",
                           manifest=json.loads(path.read_text()) if path.exists() else None)


@pytest.mark.slow   # ~110 s (the lowering of a Q/DQ graph); the shared PT2E job runs fast in test_quantize_tflite
def test_int8_pte_keeps_accuracy_in_one_xnnpack_delegate(trained, pte_int8):
    assert pte_int8.res.exit_code == 0, pte_int8.res.output
    m = pte_int8.manifest
    assert m["format"] == "pte" and m["gate"]["passed"] and m["gate"]["drop"] <= 1.0
    assert m["metrics"]["float"]["top1"] > 85.0          # a real classifier, measured on 200 held-out images
    assert m["evaluation"]["images"] == 200 and m["calibration"]["images"] == 32
    d = m["backend"]["delegation"]
    assert d["delegate_subgraphs"] == 1 and d["nodes_portable"] == 0, d["portable_by_op"]
    assert m["checks"]["structure"]["passed"]
    assert m["sizes"]["int8_bytes"] < 0.35 * m["sizes"]["float_bytes"]   # int8 weights, not fp32
    assert "ExecuTorch" in pte_int8.res.output and "PASS" in pte_int8.res.output
    # the sensitivity table names graph nodes that --keep-float takes
    acts = [s for s in m["sensitivity"] if s["kind"] == "activation"]
    assert acts and all(s["nodes"] for s in m["sensitivity"])
    assert any(s["op_type"] == "conv2d" for s in m["sensitivity"] if s["kind"] == "weight")


@pytest.mark.slow
def test_int8_pte_runs_and_agrees_with_float(trained, pte_int8):
    """The saved .pte in ExecuTorch against the float model, image by image."""
    from edgevit_export import api
    from edgevit_export.calibration import accuracy as acc
    from edgevit_export.calibration import data as cdata
    from edgevit_export.registry import get_model_info

    info = get_model_info("shvit_s1")
    pre = cdata.Preprocess((64, 64), info.mean, info.std)
    files = sorted(trained.test.rglob("*.png"))[::50][:20]
    x = np.stack([it.x for it in cdata.ImageSource(files, pre)])
    _, _, model, _ = api.prepare_model("shvit_s1", 64, str(trained.ckpt), None)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    q = acc.ArtifactPredictor(pte_int8.artifact, threads=1)(x)
    assert q.shape == ref.shape
    assert (q.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert acc.agreement(ref, q).cosine > 0.95
    assert not np.allclose(q, ref, atol=1e-4)      # it is int8: not the float program again


def test_pte_quantize_bad_input_is_one_line(cli, trained, tmp_path, monkeypatch):
    base = ["quantize", "shvit_s1", "--res", 64, "--weights", trained.ckpt, "--format", "pte", "--calib",
            trained.calib, "--out", tmp_path / "out"]
    for extra, message in ((("--method", "entropy"), "--method entropy does not apply to --format pte"),
                           (("--reduce-range",), "--reduce-range applies to --format onnx"),
                           (("--keep-float", "conv2d_71x"), "no node named 'conv2d_71x' (did you mean conv2d_71")):
        res = cli(*base, *extra)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and lines[-1].startswith("error:") and message in lines[-1], res.output
        assert "Traceback" not in res.output
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    res = cli("quantize", trained.onnx, "--format", "pte", "--calib", trained.calib, "--out", tmp_path / "o2")
    assert res.exit_code == 2 and "--format pte needs a model name" in res.output
    for mod in ("executorch", "executorch.exir", "executorch.runtime"):
        monkeypatch.setitem(sys.modules, mod, None)
    res = cli(*base)
    assert res.exit_code == 2 and "pip install" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_pte_keep_float_auto_steps_then_gate(cli, trained, tmp_path):
    """No labels and --max-drop 0: the gate is top-1 disagreement; auto keeps the worst nodes in
    float (steps measured on the emulation), lowers once, and exits 1 when the gate still fails."""
    res = cli("quantize", "shvit_s1", "--res", 64, "--weights", trained.ckpt, "--format", "pte", "--calib",
              trained.calib, "--calib-size", 32, "--eval-size", 150, "--max-drop", 0, "--keep-float", "auto",
              "--keep-float-max", 2, "--sensitivity", 4, "--out", tmp_path, "--threads", THREADS)
    m = json.loads((tmp_path / "shvit_s1-64.int8.pte.json").read_text())
    assert m["gate"]["metric"] == "top-1 disagreement with float (%)"
    if m["metrics_before_keep_float"] is None:          # the emulation agreed with float on every image
        assert res.exit_code == 0
        return
    steps = m["quantization"]["keep_float_steps"]
    assert 1 <= len(steps) <= 2 and m["quantization"]["excluded_nodes"] == [n for s in steps for n in s["added"]]
    assert "kept in float" in res.output and any("emulation" in n for n in m["notes"])
    assert res.exit_code == (0 if m["gate"]["passed"] else 1), res.output
    assert (tmp_path / "shvit_s1-64.int8.pte").is_file()   # a failed gate keeps the artifact
