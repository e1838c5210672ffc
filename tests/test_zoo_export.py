"""Every model of the zoo exports to ONNX and Core ML and matches PyTorch.

The fast tier exports one model per family at a small resolution; the slow tier (`make test-all`)
sweeps every model at 224, 512 and 1024 in both formats.
"""

import pytest

from edgevit_export import api


def _family_representatives():
    from edgevit_export.registry import get_model_info, list_models

    seen = {}
    for n in list_models():
        info = get_model_info(n)
        seen.setdefault(info.family, (n, max(64, info.min_res)))
    return sorted(seen.values())


def _export_and_check(name, res, fmt, tmp_path, precision="fp16", r=None):
    r = r or api.export(name, format=fmt, res=res, out=tmp_path, precision=precision)
    assert r.passed, r.checks
    assert r.checks["program"]["max_rel"] <= 1e-4     # the rewritten torch program, fp32
    p = r.checks["parity"]                            # the saved artifact in its runner
    if fmt == "onnx" or precision == "fp32":
        assert p["gated"] and p["max_rel"] <= 1e-4, p
    else:  # an fp16 package of a random network: recorded, not gated; a broken op would show far more
        assert not p["gated"] and p["cosine"] >= 0.99 and p["max_rel"] < 0.2, p
    if fmt == "coreml":
        assert r.checks["structure"]["max_rank"] <= 5
    return r


@pytest.mark.slow  # the family test files check raw ONNX parity in the fast tier
@pytest.mark.parametrize("name, res", _family_representatives())
def test_one_model_per_family_onnx(name, res, tmp_path):
    _export_and_check(name, res, "onnx", tmp_path)


def _fp16_cases():
    """MobileNetV3 (no fp32 ops in its fp16 program) in the fast tier, LITv2 (the one family with fp32
    ops) there through test_litv2.py's fp16 sampling-grid test; the other families' fp16 programs are
    checked by make test-all (their fp32 programs run in the runner below, in the fast tier)."""
    return [m if m[0].startswith("mobilenetv3") else pytest.param(*m, marks=pytest.mark.slow)
            for m in _family_representatives() if not m[0].startswith("shvit")]


@pytest.mark.parametrize("name, res", _fp16_cases())
def test_one_model_per_family_coreml(name, res, tmp_path):
    r = _export_and_check(name, res, "coreml", tmp_path)
    # fp16 program: only grid sampling (LITv2's deformable conv) and its coordinates stay fp32
    fp32_ops = r.checks["structure"]["fp32_ops"]
    if name.startswith("litv2"):
        assert fp32_ops["resample"] == 3 and fp32_ops["conv"] == 3, fp32_ops  # 3 DTMs: sampler + offset conv
    else:
        assert fp32_ops == {}, fp32_ops


def _fp32_cases():
    """Every family's fp32 program in the runner: SHViT and EdgeViT in the fast tier; LITv2 and
    MobileNetV3 run their fp16 programs in the runner there (above, test_litv2.py); EfficientViT,
    EfficientFormer and FastViT (15-25 s each) in make test-all, beside the whole sweep."""
    return [pytest.param(*m, marks=pytest.mark.slow)
            if m[0].startswith(("litv2", "mobilenetv3", "efficientvit", "efficientformer", "fastvit"))
            else m for m in _family_representatives()]


@pytest.mark.parametrize("name, res", _fp32_cases())
def test_one_model_per_family_coreml_fp32_in_the_runner(name, res, tmp_path, request):
    shared = request.getfixturevalue("coreml_fp32_s1_64") if (name, res) == ("shvit_s1", 64) else None
    _export_and_check(name, res, "coreml", tmp_path, precision="fp32", r=shared)


def _sweep():
    from edgevit_export.registry import list_models

    return [(n, r, f, p) for n in list_models() for r in (224, 512, 1024)
            for f, p in (("onnx", "fp32"), ("coreml", "fp16"), ("coreml", "fp32"))]


@pytest.mark.slow
@pytest.mark.parametrize("name, res, fmt, precision", _sweep())
def test_zoo_sweep(name, res, fmt, precision, tmp_path):
    _export_and_check(name, res, fmt, tmp_path, precision)
