"""`export … --format coreml`: an mlpackage Xcode accepts, checked structurally and numerically."""

import json
import sys

import pytest
import torch

from edgevit_export import api


def _spec(path):
    from edgevit_export.exporters.coreml import _ct

    return _ct().models.MLModel(str(path), skip_model_load=True).get_spec()


@pytest.fixture(scope="module")
def s1_coreml(coreml_s1_64):
    return coreml_s1_64


def test_default_is_image_in_classifier_out(s1_coreml):
    r = s1_coreml
    assert r.artifact.suffix == ".mlpackage" and r.artifact.is_dir()
    spec = _spec(r.artifact)
    assert spec.description.input[0].name == "image"
    assert spec.description.input[0].type.WhichOneof("Type") == "imageType"
    assert spec.description.predictedFeatureName == "classLabel"
    meta = dict(spec.description.metadata.userDefined)
    assert meta["model"] == "shvit_s1" and meta["resolution"] == "64x64" and int(meta["params"]) > 6_000_000
    assert "SHViT" in spec.description.metadata.shortDescription
    assert "mean" in meta["normalization"]
    assert r.manifest["normalization"]["in_graph"] is True


def test_checks_pass_and_are_recorded(s1_coreml):
    r = s1_coreml
    m = json.loads(r.manifest_path.read_text())
    assert r.manifest_path.name == "shvit_s1-64.coreml.json"
    s = m["checks"]["structure"]
    assert s["passed"] and s["max_rank"] <= 5 and s["ops"]["conv"] > 50
    assert m["checks"]["program"]["passed"] and m["checks"]["program"]["max_rel"] <= 1e-4
    fp16 = m["checks"]["parity"]  # the fp16 package in the runner; random weights: recorded, not gated
    assert fp16["gated"] is False and "--weights" in fp16["note"] and 0 < fp16["max_rel"] < 1
    assert "Core ML reference runner" in fp16["reference"] and fp16["tolerance"] == 2e-2
    assert m["gate"] == {"tolerance": 2e-2, "min_cosine": 0.999, "gated": False, "note": fp16["note"]}
    assert "normalize_input" in [p["name"] for p in m["passes"]]


def _checkpoint(tmp_path, scale_head: float = 1.0):
    _, _, model, _ = api.prepare_model("shvit_s1", 64, None, None)  # random, norm statistics calibrated
    sd = model.state_dict()
    sd["head.l.weight"] = sd["head.l.weight"] * scale_head
    path = tmp_path / "s1.pth"
    torch.save({"model": sd}, path)
    return path


@pytest.mark.slow   # ~20-30 s (tier trimmed for the 15-minute budget)
def test_fp16_check_is_gated_with_weights(cli, tmp_path):
    # with --weights the fp16 check is a gate: logits beyond fp16's range (65504) fail it
    bad = cli("export", "shvit_s1", "--format", "coreml", "--res", "64", "--weights",
              _checkpoint(tmp_path, scale_head=1e6), "--out", tmp_path / "bad")
    assert bad.exit_code == 1, bad.output
    assert "parity did not pass" in bad.output and "--precision fp32" in bad.output
    assert "Traceback" not in bad.output
    m = json.loads((tmp_path / "bad" / "shvit_s1-64.coreml.json").read_text())
    assert m["checks"]["parity"]["gated"] is True and not m["checks"]["parity"]["passed"]


@pytest.mark.slow   # the passing side of the gate (the failing side above is in the fast tier)
def test_fp16_check_passes_with_ordinary_weights(cli, tmp_path):
    ok = cli("export", "shvit_s1", "--format", "coreml", "--res", "64", "--weights", _checkpoint(tmp_path),
             "--out", tmp_path / "ok")
    assert ok.exit_code == 0, ok.output
    m = json.loads((tmp_path / "ok" / "shvit_s1-64.coreml.json").read_text())
    assert m["checks"]["parity"]["gated"] is True and m["checks"]["parity"]["passed"]


def test_classifier_labels_are_imagenet_names(s1_coreml):
    from edgevit_export.labels import imagenet_labels

    names = imagenet_labels()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    assert s1_coreml.manifest["labels"]["source"] == "imagenet-1k"


@pytest.mark.slow   # ~20-30 s (tier trimmed for the 15-minute budget)
def test_tensor_input_and_logits(tmp_path):
    r = api.export("shvit_s1", format="coreml", res=64, out=tmp_path, tensor_input=True, logits=True,
                   precision="fp32", target="iOS17")
    spec = _spec(r.artifact)
    assert spec.description.input[0].name == "images"
    assert spec.description.input[0].type.WhichOneof("Type") == "multiArrayType"
    assert [o.name for o in spec.description.output] == ["logits"] and not spec.description.predictedFeatureName
    assert "normalize_input" not in [p.name for p in r.pipeline.passes]
    assert r.passed and r.checks["parity"]["gated"] and r.checks["parity"]["max_rel"] <= 1e-4


def test_litv2_rank6_without_passes_is_named(cli, tmp_path):
    res = cli("export", "litv2_s", "--format", "coreml", "--res", "64", "--passes", "none", "--out", tmp_path)
    assert res.exit_code == 2, res.output
    assert "rank-6 tensor" in res.output and "rank_le5" in res.output and "Traceback" not in res.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--target", "iOS12"], "unknown --target"),
    (["--precision", "int4"], "unknown --precision"),
    (["--output", "model.onnx"], "must end in .mlpackage"),
])
def test_bad_coreml_flags(cli, tmp_path, args, message):
    res = cli("export", "shvit_s1", "--format", "coreml", "--res", "64", "--out", tmp_path, *args)
    assert res.exit_code == 2 and message in res.output
    assert not any(tmp_path.iterdir())


def test_labels_with_wrong_count(cli, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    res = cli("export", "shvit_s1", "--format", "coreml", "--res", "64", "--labels", labels, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "2 names but the model has 1000 classes" in res.output


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
def test_predict_on_macos_matches_pytorch(s1_coreml):
    import numpy as np
    import torch
    from PIL import Image

    from edgevit_export.exporters.coreml import _ct

    ml = _ct().models.MLModel(str(s1_coreml.artifact))
    img = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    probs = ml.predict({"image": img})["classLabel_probs"]
    _, _, model, _ = api.prepare_model("shvit_s1", 64, None, None)  # the same random network
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = torch.softmax(model(x), -1)[0]
    from edgevit_export.labels import imagenet_labels

    got = torch.tensor([probs[n] for n in imagenet_labels()])
    assert got.argmax() == ref.argmax() and (got - ref).abs().max() < 2e-2  # fp16 on the device
