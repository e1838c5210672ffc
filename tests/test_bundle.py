"""The bundle beside every artifact: the io recipe in the manifest, the labels file, the card
(MODEL-RES.md), compact pass records — for each format, as an app developer receives them."""

import json

import pytest

from edgevit_export import api
from edgevit_export.exporters import bundle
from edgevit_export.labels import imagenet_labels

RECIPE = ("channel_order", "resize", "crop", "value_range", "normalize")


def _files(r):
    labels, card = bundle.side_paths(r.manifest_path)
    return labels, card, json.loads(r.manifest_path.read_text())


def _assert_io_complete(m, image_input: bool):
    """Everything the issue lists, for every input and output."""
    io = m["io"]
    for d in io["inputs"] + io["outputs"]:
        assert d["name"] and d.get("dtype"), d
    for d in io["inputs"]:
        assert d["shape"] == [1, 3, 64, 64] and d["layout"], d
    rec = io["inputs"][0]["image"]
    assert all(k in rec for k in RECIPE), rec
    assert rec["channel_order"] == "RGB"
    assert rec["resize"]["interpolation"] == m["preprocess"]["interpolation"] == "bicubic"
    assert rec["resize"]["shorter_side"] == m["preprocess"]["resize_shorter_to"] == 73   # floor(64 / 0.875)
    assert rec["crop"] == {"kind": "center", "size": [64, 64], "crop_pct": 0.875}
    assert rec["normalize"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert rec["normalize"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert rec["normalize"]["where"] == ("model" if image_input else "app")
    assert rec["value_range"] == ([0, 255] if image_input else [0, 1])
    for d in io["outputs"]:
        assert d.get("meaning"), d


def _assert_labels(r, labels_path, m, expected):
    assert m["labels"]["file"] == labels_path.name and labels_path.is_file()
    assert labels_path.read_text().splitlines() == expected
    assert set(m["bundle"]) >= {r.artifact.name, labels_path.name, r.manifest_path.name,
                                bundle.side_paths(r.manifest_path)[1].name}
    for f in m["bundle"]:
        assert (r.manifest_path.parent / f).exists(), f


def _assert_compact_passes(m):
    """Per pass: only the counts that moved; the whole op tables once, under graph."""
    for p in m["passes"]:
        assert "before" not in p and "after" not in p
        for op, (b, a) in p["delta"].get("by_op", {}).items():
            assert b != a, (p["name"], op)
    fold = next(p for p in m["passes"] if p["name"] == "fold_batchnorm")
    assert fold["delta"]["by_op"]["batch_norm"][1] == 0 < fold["delta"]["by_op"]["batch_norm"][0]
    assert m["graph"]["before"]["by_op"]["batch_norm"] == fold["delta"]["by_op"]["batch_norm"][0]


def _steps(card: str) -> str:
    return card.split("Preprocessing", 1)[1].split("## Output", 1)[0]


def test_onnx_bundle(onnx_s1_64):
    r = onnx_s1_64
    labels, card_path, m = _files(r)
    _assert_io_complete(m, image_input=False)
    assert m["io"]["inputs"][0]["layout"] == "NCHW" and m["io"]["outputs"][0]["layout"] == "NC"
    _assert_labels(r, labels, m, imagenet_labels())
    assert m["labels"]["source"] == "imagenet-1k"
    _assert_compact_passes(m)
    card = card_path.read_text()
    steps = _steps(card)
    assert "shorter side is **73 px**" in steps and "bicubic" in steps and "Center-crop **64×64**" in steps
    assert "divide each 8-bit value by 255" in steps and "(x − mean) / std" in steps and "0.485, 0.456, 0.406" in steps
    assert "NCHW" in steps and "Do **not** normalise" not in steps
    assert "```kotlin" in card and "OrtEnvironment" in card and labels.name in card
    assert f"edgevit-export check {r.artifact.name}" in card
    assert f"{r.checks['parity']['max_abs']:.3g}" in card          # the parity figures of this export
    assert "Random weights" in card                               # exported without --weights: said on the card


def test_coreml_image_input_bundle(coreml_s1_64):
    r = coreml_s1_64
    labels, card_path, m = _files(r)
    _assert_io_complete(m, image_input=True)
    outs = {o["name"]: o for o in m["io"]["outputs"]}
    assert outs["classLabel"]["dtype"] == "string" and outs["classLabel_probs"]["shape"] == [1000]
    assert labels.name == "shvit_s1-64.coreml.labels.txt"
    _assert_labels(r, labels, m, imagenet_labels())
    card = card_path.read_text()
    steps = _steps(card)
    assert "CVPixelBuffer" in steps and "Do **not** normalise" in steps and "divide each 8-bit value" not in steps
    assert "```swift" in card and "VNCoreMLRequest" in card and "regionOfInterest" in card
    assert "let f = 0.875" in card
    assert f"{m['checks']['parity']['max_abs']:.3g}" in card       # the fp16 package's parity, from the runner


def test_coreml_tensor_input_bundle(tmp_path):
    r = api.export("shvit_s1", format="coreml", res=64, out=tmp_path, tensor_input=True, check=False)
    labels, card_path, m = _files(r)
    _assert_io_complete(m, image_input=False)
    card = card_path.read_text()
    steps = _steps(card)
    assert "divide each 8-bit value by 255" in steps and "(x − mean) / std" in steps and "CVPixelBuffer" not in steps
    assert "MLMultiArray(shape: [1, 3, 64, 64]" in card and "[0.485, 0.456, 0.406]" in card   # Swift literals
    assert "0.485f" not in card.split("```swift", 1)[1]
    assert "out.classLabel" in card                               # a classifier: its label, not a multiarray


def test_pte_and_tflite_bundles(tflite_s1_64, pte_s1_64):   # LiteRT first: built while another worker lowers the .pte
    for r, runtime in ((pte_s1_64, "Module.load"), (tflite_s1_64, "Interpreter(")):
        labels, card_path, m = _files(r)
        _assert_io_complete(m, image_input=False)
        _assert_labels(r, labels, m, imagenet_labels())
        _assert_compact_passes(m)
        card = card_path.read_text()
        assert runtime in card and "```kotlin" in card and "(x − mean) / std" in _steps(card)


def test_checkpoint_classes_travel_and_a_head_without_names_says_so(trained, tmp_path, cli80):
    import torch
    from helpers import assert_fits_80

    from edgevit_export.calibration.shapes import CLASSES

    # the trained demo checkpoint carries its classes: they become the labels file
    labels, card_path, m = _files(type("R", (), {"manifest_path": trained.onnx.with_suffix(".json"),
                                                 "artifact": trained.onnx})())
    assert m["labels"]["source"] == "checkpoint" and labels.read_text().splitlines() == list(CLASSES)
    assert m["io"]["outputs"][0]["meaning"].endswith(f"line k+1 of {labels.name}")
    # the same weights without their names: no labels file, and the export says so
    sd = torch.load(trained.ckpt, weights_only=True)["model"]
    bare = tmp_path / "bare.pth"
    torch.save({"model": sd}, bare)
    fast = ("--no-check", "--passes", "none")        # the labels do not depend on either
    res = cli80("export", "shvit_s1", "--res", "64", "--weights", bare, "--out", tmp_path / "o", *fast)
    assert res.exit_code == 0, res.output
    assert "10 classes and no names" in res.output and "--labels" in res.output
    m = json.loads((tmp_path / "o" / "shvit_s1-64.json").read_text())
    assert m["labels"]["file"] is None and m["labels"]["source"] == "none"
    assert not (tmp_path / "o" / "shvit_s1-64.labels.txt").exists()
    card = (tmp_path / "o" / "shvit_s1-64.md").read_text()
    assert "no names were given" in card and "No parity check was run" in card
    # the CLI lists what it wrote, each file once, and every file is there, at 80 columns
    for f in m["bundle"]:
        assert f in res.stdout and (tmp_path / "o" / f).exists()
    assert_fits_80(res.stdout)
    # --labels names them, for any format
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"kind {i}" for i in range(10)) + "\n")
    res = cli80("export", "shvit_s1", "--res", "64", "--weights", bare, "--out", tmp_path / "o", *fast,
                "--labels", names, "--force")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "shvit_s1-64.labels.txt").read_text().splitlines() == [f"kind {i}" for i in range(10)]
    # run reads them
    res = cli80("run", tmp_path / "o" / "shvit_s1-64.onnx")
    assert res.exit_code == 0 and "kind " in res.output, res.output


def test_quantize_of_an_exported_onnx_keeps_its_labels(onnx_s1_64):
    """An .onnx we exported carries ImageNet-1k's names beside it (which list 'crane' twice): the
    int8 artifact takes them over, it does not refuse the repeat."""
    from edgevit_export.calibration.options import QuantizeOptions
    from edgevit_export.calibration.quantize import _labels
    from edgevit_export.calibration.target import resolve_target

    target = resolve_target(str(onnx_s1_64.artifact), None, None)
    names = _labels(target, QuantizeOptions(calib="synthetic").validated(), None)
    assert names.names == imagenet_labels() and names.names.count("crane") == 2
    assert names.source == f"{onnx_s1_64.artifact.name}'s labels file"
