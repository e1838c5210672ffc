"""`export … --format coreml`: an mlpackage Xcode accepts, checked structurally and numerically."""

import json
import sys

import pytest

from edgevit_export import api


def _spec(path):
    from edgevit_export.exporters.coreml import _ct

    return _ct().models.MLModel(str(path), skip_model_load=True).get_spec()


@pytest.fixture(scope="module")
def s1_coreml(tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml")
    return api.export("shvit_s1", format="coreml", res=64, out=out)


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
    assert m["checks"]["parity"]["passed"] and m["checks"]["parity"]["max_rel"] <= 1e-4
    assert m["checks"]["parity_fp16"]["passed"] and m["checks"]["parity_fp16"]["cosine"] > 0.999
    assert "normalize_input" in [p["name"] for p in m["passes"]]


def test_classifier_labels_are_imagenet_names(s1_coreml):
    from edgevit_export.exporters.coreml import imagenet_labels

    names = imagenet_labels()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    assert s1_coreml.manifest["backend"]["labels"] == "imagenet-1k"


def test_tensor_input_and_logits(tmp_path):
    r = api.export("shvit_s1", format="coreml", res=64, out=tmp_path, tensor_input=True, logits=True,
                   precision="fp32", target="iOS17")
    spec = _spec(r.artifact)
    assert spec.description.input[0].name == "images"
    assert spec.description.input[0].type.WhichOneof("Type") == "multiArrayType"
    assert [o.name for o in spec.description.output] == ["logits"] and not spec.description.predictedFeatureName
    assert "normalize_input" not in [p.name for p in r.pipeline.passes]
    assert r.passed and "parity_fp16" not in r.checks


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

    from edgevit_export import create_model
    from edgevit_export.exporters.coreml import _ct
    from edgevit_export.weights import randomize_norm_stats

    ml = _ct().models.MLModel(str(s1_coreml.artifact))
    img = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    probs = ml.predict({"image": img})["classLabel_probs"]
    model = create_model("shvit_s1")
    randomize_norm_stats(model, 0)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = torch.softmax(model(x), -1)[0]
    from edgevit_export.exporters.coreml import imagenet_labels

    got = torch.tensor([probs[n] for n in imagenet_labels()])
    assert (got - ref).abs().max() < 1e-3
