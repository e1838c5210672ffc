"""Per-model preprocessing: each model's own eval transform (crop_pct, interpolation, mean/std from
its timm / official eval config) reaches calibration, evaluation and ``run``; ``--crop-pct``,
``--interpolation``, ``--mean``, ``--std`` override it, are checked up front and are recorded in
every manifest.

Fast by design: one small real export (fastvit_t8 at 64 px, whose own crop is 0.9), the rest on a
hand-built three-op ONNX classifier."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from edgevit_export.calibration.data import Preprocess, PreprocessOverrides
from edgevit_export.errors import EdgeExportError
from edgevit_export.registry import INTERPOLATIONS, get_model_info, list_models


def _one_line_error(res, message: str) -> None:
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert "Traceback" not in res.output


def _textured(w: int, h: int, seed: int = 0) -> Image.Image:
    """Noise with a red 4-px border: resampling filters disagree on it, and a crop removes the border."""
    px = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    px[:4], px[-4:], px[:, :4], px[:, -4:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    return Image.fromarray(px)


# --- the registry: every model's own eval transform ---------------------------------------------

@pytest.mark.parametrize("name, crop, interp", [
    ("fastvit_t8", 0.9, "bicubic"),               # timm fastvit _cfg
    ("efficientformer_l1", 0.95, "bicubic"),      # timm efficientformer _cfg
    ("efficientformerv2_s1", 0.95, "bicubic"),    # timm efficientformer_v2 _cfg
    ("mobilenetv3_large_100", 0.875, "bicubic"),  # timm ra_in1k: interpolation='bicubic' over _cfg's bilinear
    ("mobilenetv3_small_100", 0.875, "bicubic"),  # timm lamb_in1k, likewise
    ("shvit_s4", 0.875, "bicubic"),               # official: Resize(int(256 / 224 * size), bicubic)
    ("efficientvit_m0", 0.875, "bicubic"),
    ("litv2_s", 0.875, "bicubic"),
    ("edgevit_xxs", 0.875, "bicubic"),
])
def test_model_info_holds_the_models_eval_transform(name, crop, interp):
    info = get_model_info(name)
    assert (info.crop_pct, info.interpolation) == (crop, interp)
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)


def test_every_model_says_where_its_transform_comes_from():
    for name in list_models():
        info = get_model_info(name)
        assert 0 < info.crop_pct <= 1 and info.interpolation in INTERPOLATIONS, name
        assert info.preprocess_source, name


def test_info_prints_the_eval_transform_and_its_source(cli):
    res = cli("info", "fastvit_t8", "--res", "64")
    assert res.exit_code == 0, res.output
    assert "resize shorter side to 71 (bicubic, crop_pct 0.9), center-crop 64x64" in res.output
    assert "source: timm fastvit" in res.output


# --- Preprocess: the values reach it, describe() says them, overrides change the array ----------

def test_model_values_reach_preprocess_and_describe():
    pre = Preprocess.of_model(get_model_info("fastvit_t8"), (256, 256))
    assert (pre.crop_pct, pre.interpolation, pre.resize_to) == (0.9, "bicubic", 284)
    assert "resize shorter side to 284 (bicubic, crop_pct 0.9)" in pre.describe()
    # timm's floor(224 / 0.95) = 235 (rounding would give 236)
    assert Preprocess.of_model(get_model_info("efficientformer_l1"), (224, 224)).resize_to == 235
    over = Preprocess.of_model(get_model_info("mobilenetv3_small_100"), (64, 64),
                               PreprocessOverrides.parse(interpolation="bilinear"))
    assert over.interpolation == "bilinear" and "(overridden: --interpolation)" in over.describe()
    d = over.as_dict()
    assert d["interpolation"] == "bilinear" and d["crop_pct"] == 0.875 and d["resize_shorter_to"] == 73
    assert d["overrides"] == ["--interpolation"] and d["mean"] == [0.485, 0.456, 0.406]


def test_resolve_target_gives_the_model_transform_and_overrides():
    from edgevit_export.calibration.target import resolve_target

    t = resolve_target("mobilenetv3_small_100", 64, None)
    assert (t.preprocess.crop_pct, t.preprocess.interpolation) == (0.875, "bicubic")
    t = resolve_target("mobilenetv3_small_100", 64, None,
                       preprocess=PreprocessOverrides.parse(crop_pct="1", mean="0.5,0.5,0.5", std="0.5,0.5,0.5"))
    assert (t.preprocess.crop_pct, t.preprocess.mean, t.preprocess.std) == (1.0, (0.5,) * 3, (0.5,) * 3)


def test_interpolation_changes_the_array():
    img = _textured(150, 100)
    base = Preprocess((64, 64), (0.5,) * 3, (0.25,) * 3)
    bicubic = base.image(img)
    bilinear = PreprocessOverrides.parse(interpolation="bilinear").apply(base).image(img)
    nearest = PreprocessOverrides.parse(interpolation="NEAREST").apply(base).image(img)
    assert bicubic.shape == bilinear.shape == (3, 64, 64)
    assert np.abs(bicubic - bilinear).max() > 0.1 and np.abs(bilinear - nearest).max() > 0.1


def test_crop_pct_1_keeps_the_whole_image():
    base = Preprocess((64, 64), (0.0,) * 3, (1.0,) * 3)
    whole = PreprocessOverrides.parse(crop_pct=1).apply(base)
    img = _textured(96, 96)
    red = lambda x: (x[0] > 0.9) & (x[1] < 0.1) & (x[2] < 0.1)   # noqa: E731
    assert red(whole.image(img))[0].all() and red(whole.image(img))[:, 0].all()    # the border survives
    assert not red(base.image(img))[0].all()                                        # 0.875 crops it away
    at_size = _textured(64, 64, seed=1)          # an image already at the input size passes untouched
    assert np.array_equal(whole.image(at_size), np.asarray(at_size).transpose(2, 0, 1) / np.float32(255))


def test_from_manifest_reads_the_record_and_older_manifests_get_the_models_own():
    new = {"model": "fastvit_t8", "preprocess": Preprocess((64, 64), (0.1,) * 3, (0.2,) * 3, crop_pct=1.0,
                                                            interpolation="lanczos").as_dict(),
           "normalization": {"mean": [0.1] * 3, "std": [0.2] * 3, "in_graph": False}}
    pre = Preprocess.from_manifest(new, (64, 64))
    assert (pre.crop_pct, pre.interpolation, pre.mean, pre.std) == (1.0, "lanczos", (0.1,) * 3, (0.2,) * 3)
    old = {"model": "fastvit_t8", "preprocess": {"crop_pct": 0.875, "interpolation": "bicubic"},
           "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    assert Preprocess.from_manifest(old, (64, 64)).crop_pct == 0.9      # the tool-wide 0.875 of old exports
    assert Preprocess.from_manifest(None, (64, 64)).crop_pct == 0.875


@pytest.mark.parametrize("kwargs, message", [
    (dict(crop_pct=0), "--crop-pct takes a fraction 0 < F ≤ 1"),
    (dict(crop_pct="1.2"), "--crop-pct takes a fraction 0 < F ≤ 1"),
    (dict(crop_pct="nan"), "--crop-pct takes a fraction 0 < F ≤ 1"),
    (dict(interpolation="bicubik"), "unknown --interpolation 'bicubik' (did you mean bicubic?)"),
    (dict(mean="0.5,0.5"), "--mean takes three numbers R,G,B"),
    (dict(mean="a,b,c"), "--mean takes three numbers R,G,B"),
    (dict(mean="123.675,116.28,103.53"), "divide them by 255"),
    (dict(std=(0.2, 0, 0.2)), "--std is on the 0-1 pixel scale, 0 < each ≤ 1"),
])
def test_bad_override_values_are_one_line_errors(kwargs, message):
    with pytest.raises(EdgeExportError) as e:
        PreprocessOverrides.parse(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_python_values_are_taken_as_they_are():
    o = PreprocessOverrides.parse(crop_pct=0.9, interpolation="Bilinear", mean=(0, 0, 0), std=[1, 1, 1])
    assert (o.crop_pct, o.interpolation, o.mean, o.std) == (0.9, "bilinear", (0.0,) * 3, (1.0,) * 3)
    assert not PreprocessOverrides.parse() and o.flags() == ("--crop-pct", "--interpolation", "--mean", "--std")


@pytest.mark.parametrize("command", ["export", "quantize", "evaluate", "run"])
@pytest.mark.parametrize("flag, value, message", [
    ("--crop-pct", "0", "--crop-pct takes a fraction"),
    ("--interpolation", "cubic", "unknown --interpolation 'cubic'"),
    ("--mean", "0.5", "--mean takes three numbers"),
    ("--std", "58.4,57.1,57.4", "--std is on the 0-1 pixel scale"),
])
def test_cli_refuses_bad_values_before_anything_is_written(cli, tmp_path, command, flag, value, message):
    out = tmp_path / "out"
    args = {"export": ("export", "shvit_s1", "--res", "64", "--out", out),
            "quantize": ("quantize", tmp_path / "m.onnx", "--calib", tmp_path, "--out", out),
            "evaluate": ("evaluate", tmp_path / "m.onnx", "--data", tmp_path),
            "run": ("run", tmp_path / "m.onnx", "--image", tmp_path / "x.png")}[command]
    _one_line_error(cli(*args, flag, value), message)
    assert not out.exists()


# --- an ONNX classifier and its manifest: quantize / evaluate read the transform from it -------

def _tiny_onnx(path, res: int = 32, classes: int = 3):
    """conv 3→4 (stride 2) → relu → global average pool → flatten → gemm: a 1×3×res×res classifier."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(0)
    inits = [numpy_helper.from_array(g.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(g.normal(0, 0.5, (classes, 4)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "fcb")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"],
                                                                         transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, res, res])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _manifest(path, pre: Preprocess, in_graph: bool = False):
    path.with_suffix(".json").write_text(json.dumps({
        "model": "tiny", "resolution": list(pre.size), "random_init": False, "preprocess": pre.as_dict(),
        "normalization": {"mean": list(pre.mean), "std": list(pre.std), "in_graph": in_graph,
                          "input_range": "0-255" if in_graph else "normalized"}}))


@pytest.fixture
def tiny(tmp_path):
    onnx_path = _tiny_onnx(tmp_path / "tiny.onnx")
    _manifest(onnx_path, Preprocess((32, 32), (0.4, 0.4, 0.4), (0.3, 0.3, 0.3), crop_pct=0.95,
                                    interpolation="bilinear"))
    data = tmp_path / "data"
    for k, c in enumerate("abc"):
        (data / c).mkdir(parents=True)
        _textured(48, 40, seed=k).save(data / c / "i.png")
    return onnx_path, data


def test_onnx_target_reads_the_manifest_and_applies_overrides(tiny):
    from edgevit_export.calibration.target import resolve_target

    onnx_path, _ = tiny
    pre = resolve_target(str(onnx_path), None, None).preprocess
    assert (pre.crop_pct, pre.interpolation, pre.mean, pre.std) == (0.95, "bilinear", (0.4,) * 3, (0.3,) * 3)
    pre = resolve_target(str(onnx_path), None, None, preprocess=PreprocessOverrides.parse(
        crop_pct="1", interpolation="box", mean="0,0,0", std="1,1,1")).preprocess
    assert (pre.crop_pct, pre.interpolation, pre.mean, pre.std) == (1.0, "box", (0.0,) * 3, (1.0,) * 3)


def test_mean_std_cannot_override_a_graph_that_normalises(tiny):
    from edgevit_export.calibration.target import resolve_target

    onnx_path, _ = tiny
    _manifest(onnx_path, Preprocess((32, 32), (0.4,) * 3, (0.3,) * 3, raw_scale=255.0), in_graph=True)
    assert resolve_target(str(onnx_path), None, None).preprocess.raw_scale == 255.0
    assert resolve_target(str(onnx_path), None, None,
                          preprocess=PreprocessOverrides.parse(crop_pct=1)).preprocess.crop_pct == 1.0
    with pytest.raises(EdgeExportError, match="normalises inside its graph"):
        resolve_target(str(onnx_path), None, None, preprocess=PreprocessOverrides.parse(mean="0,0,0"))


def test_no_manifest_note_names_only_what_was_assumed(tmp_path):
    from edgevit_export.calibration.target import resolve_target

    onnx_path = _tiny_onnx(tmp_path / "bare.onnx")
    assert "ImageNet mean/std" in resolve_target(str(onnx_path), None, None).note
    note = resolve_target(str(onnx_path), None, None, preprocess=PreprocessOverrides.parse(
        mean="0,0,0", std="1,1,1")).note
    assert "ImageNet" not in note and "crop_pct 0.875" in note


def test_evaluate_reads_with_the_manifest_transform(tiny):
    from edgevit_export.calibration.evaluation import evaluate

    onnx_path, data = tiny
    r = evaluate(str(onnx_path), data)
    assert "bilinear, crop_pct 0.95" in r.preprocess and r.topk.images == 3
    r = evaluate(str(onnx_path), data, crop_pct="1", interpolation="nearest")
    assert "nearest, crop_pct 1" in r.preprocess and "(overridden: --crop-pct, --interpolation)" in r.preprocess


def test_quantize_manifest_records_the_transform(tiny, tmp_path):
    from edgevit_export.calibration.quantize import quantize

    onnx_path, data = tiny
    r = quantize(str(onnx_path), calib=data, calib_size=3, eval_dir=data, sensitivity_samples=0,
                 out=tmp_path / "q", interpolation="hamming", mean="0.5,0.5,0.5", std="0.5,0.5,0.5", max_drop=100)
    m = json.loads(r.manifest_path.read_text())
    assert m["preprocess"]["interpolation"] == "hamming" and m["preprocess"]["crop_pct"] == 0.95
    assert m["preprocess"]["overrides"] == ["--interpolation", "--mean", "--std"]
    assert m["normalization"]["mean"] == [0.5] * 3 and m["normalization"]["std"] == [0.5] * 3
    assert "hamming, crop_pct 0.95" in m["calibration"]["preprocess"]


def test_quantize_coreml_refuses_mean_std(cli, tmp_path):
    res = cli("quantize", tmp_path / "m.onnx", "--format", "coreml", "--mean", "0,0,0", "--out", tmp_path / "o")
    _one_line_error(res, "--mean/--std with --format coreml")


# --- one real export: the manifest records the model's own transform, run applies it -----------

@pytest.fixture(scope="module")
def fastvit_export(tmp_path_factory):
    """fastvit_t8 at 64 px (its own crop 0.9), ONNX with normalize_input and --mean/--std given:
    the graph bakes the given mean/std in, the manifest records both."""
    from edgevit_export import api

    return api.export("fastvit_t8", res=64, passes="normalize_input", check=False,
                      out=tmp_path_factory.mktemp("fastvit"), mean="0.5,0.5,0.5", std="0.25,0.25,0.25")


def test_export_manifest_records_the_transform_and_the_graph_takes_the_given_mean(fastvit_export):
    import onnxruntime as ort
    import torch

    from edgevit_export import api

    m = fastvit_export.manifest
    pp = m["preprocess"]
    assert (pp["crop_pct"], pp["interpolation"], pp["resize_shorter_to"]) == (0.9, "bicubic", 71)
    assert pp["mean"] == [0.5] * 3 and pp["std"] == [0.25] * 3 and pp["overrides"] == ["--mean", "--std"]
    assert pp["pixels"].startswith("raw 0-255")
    assert m["normalization"]["in_graph"] and m["normalization"]["mean"] == [0.5] * 3
    # the graph normalises with the given mean/std: raw pixels in, the model on (x/255 - 0.5)/0.25 out
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 64, 64)).astype(np.float32)
    sess = ort.InferenceSession(str(fastvit_export.artifact), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    _, _, model, _ = api.prepare_model("fastvit_t8", 64, None, None, mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():
        want = model(torch.from_numpy((x / 255 - 0.5) / 0.25)).numpy()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_run_image_uses_the_models_transform(cli, fastvit_export, tmp_path):
    import onnxruntime as ort

    img = tmp_path / "x.png"
    _textured(90, 70, seed=3).save(img)
    res = cli("run", fastvit_export.artifact, "--image", img, "--json", "--top", "1")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["preprocess"].startswith("resize shorter side to 71 (bicubic, crop_pct 0.9)")
    sess = ort.InferenceSession(str(fastvit_export.artifact), providers=["CPUExecutionProvider"])
    pre = Preprocess.of_model(get_model_info("fastvit_t8"), (64, 64))     # 0.9 bicubic, raw pixels in
    pre = dataclasses.replace(pre, mean=(0.5,) * 3, std=(0.25,) * 3, raw_scale=255.0)
    logits = sess.run(None, {sess.get_inputs()[0].name: pre.image(Image.open(img))[None]})[0][0]
    assert r["outputs"][0]["mean"] == pytest.approx(float(logits.mean()), rel=1e-5, abs=1e-6)
    over = json.loads(cli("run", fastvit_export.artifact, "--image", img, "--json", "--crop-pct", "1",
                          "--interpolation", "bilinear").output)
    assert over["preprocess"].startswith("resize shorter side to 64 (bilinear, crop_pct 1)")
    assert over["outputs"][0]["mean"] != r["outputs"][0]["mean"]
    _one_line_error(cli("run", fastvit_export.artifact, "--image", img, "--mean", "0,0,0"),
                    "normalises inside its graph")

