"""`run` and `check` on any artifact, the golden file, and the one format contract.

The proof that the checks execute the artifact itself: one weight changed in a saved file (an ONNX
initializer, a Core ML package's weight blob) and `check` fails on its numbers.
"""

import json
import shutil
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgevit_export import api, exporters


@pytest.fixture(scope="module")
def onnx_export(onnx_s1_64):
    return onnx_s1_64      # read only: the tests that change a weight change a copy


@pytest.fixture(scope="module")
def coreml_fp32(coreml_fp32_s1_64):
    return coreml_fp32_s1_64   # read only, like onnx_export


def _one_line_error(res, message):
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output


def test_export_writes_a_golden_file_that_reproduces_the_check(onnx_export):
    r = onnx_export
    golden = r.artifact.with_name("shvit_s1-64.golden.npz")
    assert r.manifest["golden"] == {"file": golden.name, "samples": 3}
    with np.load(golden) as z:
        assert sorted(z.files) == ["input:images", "output:logits"]
        x, y = z["input:images"], z["output:logits"]
    assert x.shape == (3, 1, 3, 64, 64) and y.shape == (3, 1, 1000)
    _, _, model, _ = api.prepare_model("shvit_s1", 64, None, None)   # the same seeded random model
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x[1])).numpy(), y[1], rtol=1e-5, atol=1e-5)
    c = api.check(r.artifact)
    assert c.passed and c.sha256_matches and c.parity["samples"] == 3
    assert c.parity["max_rel"] == pytest.approx(r.checks["parity"]["max_rel"], rel=1e-3)


def test_check_fails_when_one_onnx_weight_changes(onnx_export, tmp_path, cli):
    bad = tmp_path / onnx_export.artifact.name
    for f in onnx_export.artifact.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    m = onnx.load(str(bad))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))   # the largest weight tensor
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 10 * np.abs(w).max()
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(bad))
    c = api.check(bad)
    assert not c.passed and not c.sha256_matches and c.parity["max_rel"] > 1e-3
    res = cli("check", bad)
    assert res.exit_code == 1 and "does not match PyTorch" in res.output and "sha256" in res.output, res.output
    assert cli("check", onnx_export.artifact).exit_code == 0


def test_check_fails_when_one_coreml_weight_changes(coreml_fp32, tmp_path):
    r = coreml_fp32
    assert r.checks["parity"]["passed"] and r.checks["parity"]["max_rel"] <= 1e-4
    assert api.check(r.artifact).passed
    bad = tmp_path / r.artifact.name
    shutil.copytree(r.artifact, bad)
    for f in r.artifact.parent.glob("shvit_s1-64.coreml.*"):
        shutil.copy(f, tmp_path / f.name)
    _bump_largest_weight(bad / "Data" / "com.apple.CoreML" / "weights" / "weight.bin")
    c = api.check(bad)
    assert not c.passed and c.parity["max_rel"] > 1e-3, c.parity


def _bump_largest_weight(blob):
    """Change element 0 of the largest fp32 tensor in a Core ML weight blob (MIL blob storage: a
    64-byte header, then per tensor a 64-byte record — sentinel, dtype, size, data offset — and
    its data)."""
    data = bytearray(blob.read_bytes())
    count = int.from_bytes(data[0:4], "little")
    pos, records = 64, []
    while len(records) < count:
        sentinel, _dtype, size, offset = np.frombuffer(bytes(data[pos:pos + 24]), dtype="<u4,<u4,<u8,<u8")[0]
        assert sentinel == 0xDEADBEEF
        records.append((int(size), int(offset)))
        pos = int(offset) + int(size)
        pos += -pos % 64
    size, offset = max(records)
    w = np.frombuffer(bytes(data[offset:offset + size]), dtype="<f4")
    data[offset:offset + 4] = np.float32(w[0] + 10 * np.abs(w).max()).tobytes()
    blob.write_bytes(bytes(data))


@pytest.mark.slow   # the golden-file check runs fast in every format's tests
def test_check_with_weights_recomputes_pytorch(tmp_path, cli):
    _, _, model, _ = api.prepare_model("shvit_s1", 64, None, None)
    ckpt = tmp_path / "s1.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    r = api.export("shvit_s1", format="onnx", res=64, weights=str(ckpt), out=tmp_path / "e")
    r.artifact.with_name("shvit_s1-64.golden.npz").unlink()
    c = api.check(r.artifact, weights=str(ckpt))
    assert c.passed and "s1.pth" in c.reference
    # another checkpoint: the artifact no longer matches it
    sd = model.state_dict()
    sd["head.l.weight"] = sd["head.l.weight"] * 2
    torch.save({"model": sd}, tmp_path / "other.pth")
    assert not api.check(r.artifact, weights=str(tmp_path / "other.pth")).passed
    _one_line_error(cli("check", r.artifact), "no golden file")


@pytest.mark.parametrize("args, message", [
    (["check", "nothing.onnx"], "artifact not found"),
    (["check", "model.tflitex"], "not an artifact this tool runs"),
    (["run", "nothing.mlpackage"], "artifact not found"),
])
def test_bad_artifacts_are_one_line_errors(cli, tmp_path, args, message):
    _one_line_error(cli(*args), message)


def test_check_needs_the_manifest(cli, onnx_export, tmp_path):
    lone = tmp_path / "lone.onnx"
    shutil.copy(onnx_export.artifact, lone)
    _one_line_error(cli("check", lone), "no manifest beside")
    _one_line_error(cli("run", onnx_export.artifact, "--image", tmp_path / "missing.png"), "--image file not found")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    _one_line_error(cli("run", onnx_export.artifact, "--image", tmp_path / "junk.png"), "not a readable image")


def test_run_prints_top_k_and_output_statistics(cli, onnx_export, tmp_path):
    from PIL import Image

    img = tmp_path / "red.png"
    Image.new("RGB", (100, 80), (200, 30, 30)).save(img)
    res = cli("run", onnx_export.artifact, "--image", img, "--top", "3")
    assert res.exit_code == 0, res.output
    assert "red.png" in res.output and "random weights" in res.output and "1×1000" in res.output
    out = json.loads(cli("run", onnx_export.artifact, "--json").output)
    assert out["seeded"] and len(out["predictions"][0]["top"]) == 5
    probs = [p for _, p in out["predictions"][0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < probs[0] < 1


# --- one contract: a format is one module and one registration ---------------------------------

class _Pt2Runner:
    """A runner for the test format: the saved ExportedProgram, run by torch."""

    def __init__(self, path):
        self.module = torch.export.load(str(path)).module()
        shape = list(self.module.graph.find_nodes(op="placeholder")[0].meta["val"].shape)
        self.inputs = [{"name": "x", "shape": shape, "dtype": "float32", "kind": "tensor"}]
        self.outputs = [{"name": "y", "shape": None, "dtype": "float32"}]
        self.runtime = "torch.export.load"
        self.classifier, self.labels = False, None

    def __call__(self, inputs):
        with torch.no_grad():
            return {"y": self.module(torch.from_numpy(inputs["x"])).numpy()}

    numeric = __call__


def _pt2_module():
    from edgevit_export.exporters.check import Gate

    m = types.ModuleType("pt2_format_for_tests")
    m.validate_options = lambda **_: {"tensor_input": True}
    m.convert = lambda program, example, path, options, meta: (torch.export.save(program, str(path)), {
        "io": {"inputs": [{"name": "x"}], "outputs": [{"name": "y"}]}})[1]
    m.load = _Pt2Runner
    m.describe = lambda path: {"bytes": path.stat().st_size}
    m.structure = lambda facts, options: {"passed": facts["bytes"] > 0, "summary": f"{facts['bytes']} bytes"}
    m.gate = lambda options, trained: Gate(1e-5)
    return m


def test_a_new_format_is_one_module_and_one_registration(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pt2_format_for_tests", _pt2_module())
    monkeypatch.setitem(exporters.FORMATS, "pt2", exporters.Format("pt2", "pt2_format_for_tests", ".pt2", ".pt2",
                                                                   "ExportedProgram", ("static_shapes", "fold_batchnorm")))
    r = api.export("shvit_s1", format="pt2", res=64, out=tmp_path)
    assert r.passed and r.artifact.name == "shvit_s1-64.pt2" and r.checks["parity"]["max_rel"] < 1e-5
    assert r.manifest_path.name == "shvit_s1-64.pt2.json" and r.checks["structure"]["passed"]
    assert api.check(r.artifact).passed and api.load(r.artifact).runtime == "torch.export.load"


@pytest.mark.slow
def test_run_agrees_between_onnx_and_coreml_on_trained_weights(trained, tmp_path):
    """The shapes demo (SHViT-S1 trained on drawn shapes): both artifacts name the drawn class
    and agree on the probabilities (the Core ML package in fp16 through the reference runner)."""
    from edgevit_export.calibration.shapes import CLASSES

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    ox = api.export("shvit_s1", format="onnx", res=64, weights=str(trained.ckpt), out=tmp_path)
    ml = api.export("shvit_s1", format="coreml", res=64, weights=str(trained.ckpt), out=tmp_path, labels=str(labels))
    assert ml.checks["parity"]["gated"] and ml.checks["parity"]["passed"]
    images = [sorted((trained.test / c).iterdir())[0] for c in CLASSES]
    a = api.run(ox.artifact, images=images, top=3)
    b = api.run(ml.artifact, images=images, top=3)
    assert "the classifier's probabilities" == b.probabilities and "softmax" in a.probabilities
    right = 0
    for cls, pa, pb in zip(CLASSES, a.predictions, b.predictions):
        assert CLASSES[int(pa.top[0][0])] == pb.top[0][0]            # same class from both artifacts
        assert abs(pa.top[0][1] - pb.top[0][1]) < 2e-2               # same probability, within fp16
        right += pb.top[0][0] == cls
    assert right >= 8, [p.top for p in b.predictions]               # the demo is ~94% accurate


@pytest.mark.slow   # ~25 s; the fast tier: test_export_onnx's failed parity exits 1 and keeps the artifact
def test_an_op_the_runner_lacks_fails_the_check_and_keeps_the_artifact(cli, tmp_path, monkeypatch):
    from edgevit_export.exporters import coreml_runner

    monkeypatch.delitem(coreml_runner._IMPLS, "softmax")
    res = cli("export", "shvit_s1", "--format", "coreml", "--res", "64", "--precision", "fp32", "--out", tmp_path)
    assert res.exit_code == 1, res.output
    assert "op 'softmax'" in res.output and "PASS structure" in res.output and "Traceback" not in res.output
    assert (tmp_path / "shvit_s1-64.mlpackage").is_dir() and not (tmp_path / "shvit_s1-64.coreml.golden.npz").exists()
    m = json.loads((tmp_path / "shvit_s1-64.coreml.json").read_text())
    assert not m["checks"]["parity"]["passed"] and "softmax" in m["checks"]["parity"]["summary"]


def test_broken_golden_or_manifest_is_a_one_line_error(cli, onnx_export, tmp_path):
    for f in onnx_export.artifact.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    art = tmp_path / onnx_export.artifact.name
    golden = tmp_path / "shvit_s1-64.golden.npz"
    golden.write_bytes(golden.read_bytes()[:200])                  # truncated
    _one_line_error(cli("check", art), "golden file")
    np.savez(golden, **{"input:images": np.zeros((1, 1, 3, 32, 32), np.float32),
                        "output:logits": np.zeros((1, 1, 1000), np.float32)})   # another model's inputs
    _one_line_error(cli("check", art), "onnxruntime cannot run")
    (tmp_path / "shvit_s1-64.json").write_text("[1, 2]")
    _one_line_error(cli("check", art), "not a manifest")
