"""int8 LiteRT: `quantize --format tflite` on the trained shapes classifier (see test_quantize.py's
`trained` fixture): PT2E with litert-torch's quantizer, one XNNPACK partition with nothing outside,
float inputs and outputs (or int8 with --int8-io), the accuracy drop measured on the saved .tflite
in LiteRT's interpreter."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

if importlib.util.find_spec("litert_torch") is None:
    pytest.skip("litert-torch is not installed", allow_module_level=True)

THREADS = "1"


def _quantize(trained, out, *extra):
    from typer.testing import CliRunner

    from edgevit_export.cli import app

    res = CliRunner().invoke(app, [str(a) for a in (
        "quantize", "shvit_s1", "--res", 64, "--weights", trained.ckpt, "--format", "tflite", "--calib",
        trained.calib, "--calib-size", 32, "--out", out, "--threads", THREADS, *extra)])
    path = out / "shvit_s1-64.int8.tflite.json"
    return SimpleNamespace(res=res, out=out, artifact=out / "shvit_s1-64.int8.tflite",
                           manifest=json.loads(path.read_text()) if path.exists() else None)


@pytest.fixture(scope="session")
def tflite_int8(trained, tmp_path_factory):
    return _quantize(trained, tmp_path_factory.mktemp("int8-tflite"), "--eval", trained.test, "--eval-size", 200,
                     "--max-drop", 1.0)


def _shapes_images(trained, n=20):
    from edgevit_export.calibration import data as cdata
    from edgevit_export.registry import get_model_info

    info = get_model_info("shvit_s1")
    pre = cdata.Preprocess((64, 64), info.mean, info.std)
    files = sorted(trained.test.rglob("*.png"))[::50][:n]
    return np.stack([it.x for it in cdata.ImageSource(files, pre)])


@pytest.mark.slow   # a PT2E quantize + LiteRT conversion; the int8 rewrites run in the fast tier below
def test_int8_tflite_keeps_accuracy_in_one_xnnpack_partition(tflite_int8):
    assert tflite_int8.res.exit_code == 0, tflite_int8.res.output
    m = tflite_int8.manifest
    assert m["format"] == "tflite" and m["gate"]["passed"] and m["gate"]["drop"] <= 1.0
    assert m["metrics"]["float"]["top1"] > 85.0 and m["evaluation"]["images"] == 200
    d = m["backend"]["delegation"]
    assert d["delegate_partitions"] == 1 and d["ops_outside"] == 0, d["outside_by_op"]
    assert m["checks"]["structure"]["passed"]
    assert m["sizes"]["int8_bytes"] < 0.35 * m["sizes"]["float_bytes"]   # int8 weights, not fp32 fake-quant
    ins, outs = m["io"]["inputs"], m["io"]["outputs"]
    assert ins[0]["dtype"] == "float32" and outs[0]["dtype"] == "float32"   # float for the app
    assert "LiteRT" in tflite_int8.res.output and "PASS" in tflite_int8.res.output
    ops = m["backend"]["ops"]
    assert ops.get("QUANTIZE", 0) >= 1 and ops.get("DEQUANTIZE", 0) >= 1 and "HARD_SWISH" not in ops


@pytest.mark.slow
def test_int8_tflite_runs_and_agrees_with_float(trained, tflite_int8):
    from edgevit_export import api
    from edgevit_export.calibration import accuracy as acc

    x = _shapes_images(trained)
    _, _, model, _ = api.prepare_model("shvit_s1", 64, str(trained.ckpt), None)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    q = acc.ArtifactPredictor(tflite_int8.artifact, threads=1)(x)
    assert q.shape == ref.shape and (q.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert acc.agreement(ref, q).cosine > 0.95
    assert not np.allclose(q, ref, atol=1e-4)      # it is int8: not the float program again


@pytest.mark.slow
def test_int8_io_takes_and_gives_int8_tensors(trained, tmp_path):
    from edgevit_export.calibration import accuracy as acc
    from edgevit_export.exporters import tflite

    r = _quantize(trained, tmp_path, "--int8-io", "--eval", trained.test, "--eval-size", 40, "--sensitivity", 0)
    assert r.res.exit_code == 0, r.res.output
    runner = tflite.load(r.artifact, threads=1)
    (inp,), (out,) = runner.inputs, runner.outputs
    assert inp["dtype"] == "int8" and out["dtype"] == "int8" and inp["quantization"]["scale"] > 0
    assert r.manifest["io"]["inputs"][0]["quantization"] == inp["quantization"]
    # the runner quantizes float images with the input's scale/zero point: the predictions still hold
    x = _shapes_images(trained)
    ref = acc.ArtifactPredictor(tmp_path / "shvit_s1-64.int8.tflite", threads=1)(x)
    assert ref.dtype == np.float32 and np.isfinite(ref).all()


def test_tflite_quantize_bad_input_is_one_line(cli, trained, tmp_path, monkeypatch):
    base = ["quantize", "shvit_s1", "--res", 64, "--weights", trained.ckpt, "--calib", trained.calib,
            "--out", tmp_path / "out"]
    for extra, message in ((("--format", "tflite", "--method", "entropy"), "--method entropy does not apply"),
                           (("--format", "pte", "--int8-io"), "--int8-io applies to --format tflite")):
        res = cli(*base, *extra)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and lines[-1].startswith("error:") and message in lines[-1], res.output
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    for mod in ("litert_torch", "ai_edge_litert", "ai_edge_litert.interpreter"):
        monkeypatch.setitem(sys.modules, mod, None)
    res = cli(*base, "--format", "tflite")
    assert res.exit_code == 2 and "pip install" in res.output and "Traceback" not in res.output


class HardSwishBlock(torch.nn.Module):
    """MobileNetV3's shapes: conv → hard-swish → conv, a hard-sigmoid gate, a residual."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.act = torch.nn.Hardswish(inplace=True)
        self.se = torch.nn.Conv2d(c, c, 1)
        self.gate = torch.nn.Hardsigmoid()
        self.out = torch.nn.Conv2d(c, c, 1)
        self.act2 = torch.nn.Hardswish(inplace=True)
        self.last = torch.nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.se(self.act(self.conv(x)))
        y = y * self.gate(y)
        return self.last(self.act2(self.out(y) + x))


@pytest.mark.parametrize("rewrite", [False, True])
def test_hardswish_as_relu6_keeps_int8_hardswish_inside_xnnpack(tmp_path, rewrite):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgevit_export.calibration import tflite_int8
    from edgevit_export.exporters import tflite
    from edgevit_export.passes import PassContext, run_passes

    x = torch.randn(1, 16, 8, 8)
    m = HardSwishBlock().eval()
    names = ["static_shapes"] + (["hardswish_as_relu6"] if rewrite else [])   # re-exported, as export does
    pipe = run_passes(torch.export.export(m, (x,)), names, PassContext((x,)))
    assert not [p.refused for p in pipe.passes if p.refused]          # the rewrite is proven exact in fp32
    q = tflite_int8.quantizer(True, "minmax", set())
    prepared = prepare_pt2e(pipe.program.module(), q)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        prepared(torch.randn(1, 16, 8, 8, generator=g))
    gm = tflite_int8.fold_relu_into_quantize(convert_pt2e(prepared, fold_quantize=False))
    path = tmp_path / "m.tflite"
    opts = SimpleNamespace(int8_io=False)
    tflite_int8.lower(gm, x, path, q, opts)
    d = tflite.describe(path)
    with torch.no_grad():
        ref = m(x).numpy()
    out = tflite.load(path)({"images": x.numpy()})["logits"]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.1          # int8, but the same function
    if rewrite:
        assert d["delegation"]["ops_outside"] == 0 and "HARD_SWISH" not in d["ops"], d["delegation"]
    else:                                                              # what the rewrite is for
        assert d["delegation"]["outside_by_op"].get("HARD_SWISH", 0) >= 1, d["delegation"]
