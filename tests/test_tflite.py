"""LiteRT (.tflite, XNNPACK): the matmul rewrite that keeps attention products inside the
delegate, the saved model in LiteRT's interpreter against PyTorch, the NHWC input contract, check
and run on .tflite, and the one-line errors."""

import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgevit_export.passes import PassContext, run_passes

if importlib.util.find_spec("litert_torch") is None:   # not imported here: only the tests that convert load it
    pytest.skip("litert-torch is not installed", allow_module_level=True)

from edgevit_export.exporters import tflite  # noqa: E402


class SingleHead(nn.Module):
    """SHViT's single-head attention shape: ``v @ attn.T`` with a batch of one (what litert-torch
    folds into a FULLY_CONNECTED whose weights are the attention), plus a product with a weight."""

    def __init__(self, c=24, n=16):
        super().__init__()
        self.qk = nn.Conv2d(c, 2 * 8, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.w = nn.Parameter(torch.randn(c, c) / c ** 0.5)

    def forward(self, x):                                       # x: (1, C, 4, 4)
        q, k = self.qk(x).flatten(2).chunk(2, dim=1)            # (1, 8, N)
        attn = (q.transpose(-2, -1) @ k).softmax(-1)            # (1, N, N)
        v = self.v(x).flatten(2)                                # (1, C, N)
        y = v @ attn.transpose(-2, -1)                          # (1, C, N)
        return (y.transpose(1, 2) @ self.w).mean(1)             # a product with a weight: stays


X = torch.randn(1, 24, 4, 4)


def _converted(tmp_path, passes):
    m = SingleHead().eval()
    pipe = run_passes(torch.export.export(m, (X,)), passes, PassContext((X,)))
    path = tmp_path / f"m{len(passes)}.tflite"
    tflite.convert(pipe.program, X, path, {"layout": "nchw"})
    out = tflite.load(path)({"images": X.numpy()})["logits"]
    with torch.no_grad():
        ref = m(X).numpy()
    return pipe, tflite.describe(path), float(np.abs(out - ref).max() / np.abs(ref).max())


def test_matmul_as_einsum_keeps_attention_products_inside_xnnpack(tmp_path):
    _, plain, err = _converted(tmp_path, [])
    assert plain["delegation"]["outside_by_op"].get("FULLY_CONNECTED", 0) >= 1   # v @ attn.T left to builtins
    assert err <= 1e-5
    pipe, after, err = _converted(tmp_path, ["matmul_as_einsum"])
    assert pipe.passes[0].changed == 2                                         # the two activation products
    assert after["delegation"]["ops_outside"] == 0 and after["delegation"]["delegate_partitions"] == 1
    assert after["ops"].get("BATCH_MATMUL", 0) == 2 and after["ops"].get("FULLY_CONNECTED", 0) == 1
    assert err <= 1e-5


def test_export_tflite_runs_in_litert_and_matches_pytorch(tflite_s1_64):
    r = tflite_s1_64
    assert r.passed, r.checks
    assert r.artifact.suffix == ".tflite" and r.checks["parity"]["max_rel"] <= 1e-4
    assert "LiteRT" in r.checks["parity"]["reference"]
    m = json.loads(r.manifest_path.read_text())
    d = m["backend"]["delegation"]
    assert d["delegate_partitions"] == 1 and d["ops_outside"] == 0, d
    assert m["backend"]["ops"]["TRANSPOSE"] >= 1 and "TRANSPOSE" in r.checks["structure"]["summary"]
    assert [i["name"] for i in m["io"]["inputs"]] == ["images"] and m["io"]["inputs"][0]["shape"] == [1, 3, 64, 64]
    assert m["normalization"]["layout"] == "nchw" and "litert-torch" in m["tools"]


def test_tflite_check_run_and_bench(tflite_s1_64, cli, tmp_path):
    from edgevit_export import api

    rep = api.check(tflite_s1_64.artifact)
    assert rep.passed and rep.sha256_matches and "LiteRT" in rep.runtime
    res = cli("run", tflite_s1_64.artifact, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["outputs"][0]["shape"] == [1, 1000] and len(out["predictions"][0]["top"]) == 5
    # a tampered golden output: the check fails (exit 1), it does not crash
    for f in tmp_path.iterdir():
        f.unlink()
    art = tflite_s1_64.artifact
    golden = art.with_name(art.stem + ".tflite.golden.npz")
    for f in (art, tflite_s1_64.manifest_path, golden):
        shutil.copy(f, tmp_path / f.name)
    with np.load(golden) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output:logits"] = arrays["output:logits"] + 1.0
    np.savez(tmp_path / golden.name, **arrays)
    res = cli("check", tmp_path / art.name)
    assert res.exit_code == 1 and "Traceback" not in res.output


class RGBNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_nhwc_layout_converts_an_interleaved_input(tmp_path):
    x = torch.randn(1, 3, 12, 10)
    m = RGBNet().eval()
    pipe = run_passes(torch.export.export(m, (x,)), ["static_shapes"], PassContext((x,)))
    path = tmp_path / "nhwc.tflite"
    tflite.convert(pipe.program, x, path, {"layout": "nhwc"})
    runner = tflite.load(path)
    assert runner.inputs[0]["shape"] == [1, 12, 10, 3] and runner.inputs[0]["layout"] == "nhwc"
    out = runner({"images": x.permute(0, 2, 3, 1).numpy()})["logits"]
    with torch.no_grad():
        ref = m(x).numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.slow   # the converter side runs fast above; this is the CLI, manifest and run --image path
def test_nhwc_layout_takes_an_interleaved_image(cli, tmp_path):
    from PIL import Image, ImageDraw

    res = cli("export", "shvit_s1", "--format", "tflite", "--res", "64", "--layout", "nhwc", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    art = tmp_path / "shvit_s1-64.tflite"
    m = json.loads((tmp_path / "shvit_s1-64.tflite.json").read_text())
    assert m["io"]["inputs"][0]["shape"] == [1, 64, 64, 3] and m["normalization"]["layout"] == "nhwc"
    assert m["checks"]["parity"]["max_rel"] <= 1e-4
    img = Image.new("RGB", (96, 80), "white")
    ImageDraw.Draw(img).ellipse((20, 10, 70, 60), fill="red")
    img.save(tmp_path / "dot.png")
    res = cli("run", art, "--image", tmp_path / "dot.png", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["predictions"][0]["source"].endswith("dot.png")
    # the same image through the NCHW contract of PyTorch gives the same logits
    from edgevit_export import api
    from edgevit_export.calibration.data import Preprocess, load_image

    pre = Preprocess((64, 64), tuple(m["normalization"]["mean"]), tuple(m["normalization"]["std"]))
    chw = pre.image(load_image(tmp_path / "dot.png"))
    out = api.load(art)({"images": chw.transpose(1, 2, 0)[None]})["logits"]
    _, _, model, _ = api.prepare_model("shvit_s1", 64, None, None)
    with torch.no_grad():
        ref = model(torch.from_numpy(chw[None])).numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_tflite_bad_input_is_one_line(cli, tmp_path, monkeypatch):
    res = cli("export", "shvit_s1", "--format", "tflite", "--res", "64", "--output", tmp_path / "m.onnx")
    assert res.exit_code == 2 and "must end in .tflite" in res.output
    res = cli("export", "shvit_s1", "--format", "tflite", "--res", "64", "--layout", "hwcn", "--out", tmp_path)
    assert res.exit_code == 2 and "--layout" in res.output and not list(tmp_path.iterdir())
    for mod in ("litert_torch", "ai_edge_litert", "ai_edge_litert.interpreter"):
        monkeypatch.setitem(sys.modules, mod, None)
    res = cli("export", "shvit_s1", "--format", "tflite", "--res", "64", "--out", tmp_path)
    assert res.exit_code == 2 and "pip install" in res.output and "tflite" in res.output
    assert "Traceback" not in res.output and not list(tmp_path.iterdir())
    res = cli("bench", "shvit_s1", "--res", "64", "--runtime", "litert")
    assert res.exit_code == 2 and "pip install" in res.output


class Deformable(nn.Module):
    """LITv2's deformable sampling and its token ↔ map hops: tokens → map → grid_sample at learned
    offsets (some far outside the map) → conv → tokens."""

    def __init__(self, c=8):
        super().__init__()
        self.offset = nn.Conv2d(c, 2, 3, padding=1)
        self.proj = nn.Conv2d(c, c, 1)
        with torch.no_grad():
            self.offset.weight.normal_(0, 0.8)                  # offsets of a few pixels: bilinear, not on-pixel

    def forward(self, t):                                       # t: (1, 36, C), a 6×6 map
        b, n, c = t.shape
        x = t.transpose(1, 2).reshape(b, c, 6, 6)
        base = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 6), indexing="xy"), -1)
        grid = base[None] + self.offset(x).permute(0, 2, 3, 1)
        y = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return self.proj(y).flatten(2).transpose(1, 2)


def test_grid_sample_gather_and_token_maps_take_the_sampling_into_xnnpack(tmp_path):
    torch.manual_seed(0)          # the module's weights and input: the same draw every run
    t = torch.randn(1, 36, 8)
    m = Deformable().eval()
    outs = {}
    for passes in ([], ["grid_sample_gather", "token_maps"]):
        pipe = run_passes(torch.export.export(m, (t,)), passes, PassContext((t,)))
        assert not [p.refused for p in pipe.passes if p.refused]
        path = tmp_path / f"d{len(passes)}.tflite"
        tflite.convert(pipe.program, t, path, {"layout": "nchw"})
        outs[len(passes)] = tflite.describe(path), tflite.load(path)({"images": t.numpy()})["logits"]
    with torch.no_grad():
        ref = m(t).numpy()
    (plain, y0), (after, y1) = outs[0], outs[2]
    assert plain["delegation"]["outside_by_op"].get("GATHER_ND", 0) >= 4          # PyTorch's decomposition
    assert set(after["delegation"]["outside_by_op"]) <= {"GATHER", "CAST", "RESHAPE", "BROADCAST_TO"}
    assert after["delegation"]["ops_outside"] < plain["delegation"]["ops_outside"] / 2
    assert after["transposes"] < plain["transposes"]
    for y in (y0, y1):
        assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-5


class SparseSampling(nn.Module):
    """EdgeViT's global sparse attention resampling: every r-th pixel (AvgPool2d(1, r)), then local
    propagation back by a depthwise transposed conv with kernel = stride = r."""

    def __init__(self, c=16, r=2):
        super().__init__()
        self.sampler = nn.AvgPool2d(1, r)
        self.prop = nn.ConvTranspose2d(c, c, r, stride=r, groups=c)

    def forward(self, x):
        return self.prop(self.sampler(x).sigmoid())


def test_deconv_as_shuffle_takes_edgevits_resampling_into_xnnpack(tmp_path):
    x = torch.randn(1, 16, 8, 8)
    m = SparseSampling().eval()
    with torch.no_grad():
        ref = m(x).numpy()
    facts = {}
    for passes in ([], ["deconv_as_shuffle"]):
        pipe = run_passes(torch.export.export(m, (x,)), passes, PassContext((x,)))
        assert not [p.refused for p in pipe.passes if p.refused]
        path = tmp_path / f"e{len(passes)}.tflite"
        tflite.convert(pipe.program, x, path, {"layout": "nchw"})
        facts[len(passes)] = tflite.describe(path)
        y = tflite.load(path)({"images": x.numpy()})["logits"]
        assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-5
    plain, after = facts[0]["delegation"], facts[1]["delegation"]
    assert {"CONCATENATION", "AVERAGE_POOL_2D"} <= set(plain["outside_by_op"])     # 16 TRANSPOSE_CONVs joined
    assert after["ops_outside"] == 0 and after["delegate_partitions"] == 1, after
    assert "TRANSPOSE_CONV" not in facts[1]["ops"] and facts[1]["nodes"] < facts[0]["nodes"] / 3
