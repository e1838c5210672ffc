"""The Core ML reference runner: tiny programs converted by coremltools from small torch modules (or
built with MIL's builder) are saved as .mlpackage and executed op by op; results are compared with
torch (fp32: ≤ 1e-5 relative) and with the ops' own ``value_inference`` in coremltools."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("TQDM_DISABLE", "1")
logging.getLogger("coremltools").setLevel(logging.ERROR)
with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb

from edgevit_export.errors import EdgeExportError  # noqa: E402
from edgevit_export.exporters import coreml_runner  # noqa: E402
from edgevit_export.exporters.coreml_runner import UnsupportedOp, load  # noqa: E402

# Every op type found in the zoo's programs (23 models at 64 px fp16 image classifiers, fp32
# tensor-input logits, iOS18 target, 224 px; int8 / 4-bit palettized weight compression).
ZOO_OPS = {
    "add", "avg_pool", "batch_norm", "cast", "classify", "concat", "const", "conv", "conv_transpose",
    "expand_dims", "gelu", "layer_norm", "linear", "matmul", "mul", "reduce_mean", "relu", "reshape",
    "resample", "sigmoid", "slice_by_index", "softmax", "split", "squeeze", "stack", "sub", "transpose",
    "upsample_bilinear", "constexpr_affine_dequantize", "constexpr_lut_to_dense",
    "square", "sqrt", "real_div", "sigmoid_hard", "thresholded_relu",
}

RTOL = 1e-5


def _quiet(fn, *a, **k):
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **k)


def _convert(module: nn.Module, x: torch.Tensor, path: Path, *, precision="fp32", inputs=None, **kw) -> Path:
    module = module.eval()
    with torch.no_grad():
        ep = torch.export.export(module, (x,))
    ep = ep.run_decompositions({})
    ml = _quiet(ct.convert, ep, inputs=inputs or [ct.TensorType(name="x", shape=tuple(x.shape), dtype=np.float32)],
                convert_to="mlprogram", minimum_deployment_target=kw.pop("target", ct.target.iOS16),
                compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16, **kw)
    ml.save(str(path))
    return path


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# --- tiny torch modules that together use every op type the zoo's programs use ---------------------

class ConvNet(nn.Module):
    """conv (strides, pads, groups, dilations, 1×1, bias / no bias), batch_norm, relu, sigmoid, gelu,
    hardswish / hardsigmoid (thresholded_relu, sigmoid_hard), GroupNorm(1, C) (rank-5 reduce_mean,
    square, sqrt, real_div),
    avg_pool (both exclude-padding settings, ceil_mode), conv_transpose (groups, output_padding),
    upsample_bilinear (align_corners both ways), reduce_mean (keep_dims both ways)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.pw = nn.Conv2d(8, 16, 1)
        self.gn = nn.GroupNorm(1, 16)
        self.asym = nn.Conv2d(16, 16, (1, 3), stride=(1, 2), padding=(0, 1), groups=4)
        self.up = nn.ConvTranspose2d(16, 16, 2, stride=2, groups=16)
        self.up2 = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.bn(torch.relu(self.stem(x)))                                   # 8×8×8 (BN not foldable)
        x = x + F.gelu(self.dw(x))
        x = torch.sigmoid(self.dil(x)) * x
        x = F.hardswish(x) * F.hardsigmoid(x)
        x = self.gn(self.pw(x))                                                 # 16×8×8
        a = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        b = F.avg_pool2d(x, 3, 2, 1, count_include_pad=True, ceil_mode=True)   # 16×5×5 (ceil)
        c = F.avg_pool2d(x, 2, 2)
        x = a + F.interpolate(c, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = x + F.interpolate(b, size=(8, 8), mode="bilinear", align_corners=True)
        x = self.asym(x)                                                        # 16×8×4
        x = self.up(x)                                                          # 16×16×8
        x = self.up2(x)                                                         # 8×32×16
        g = x.mean(dim=(2, 3), keepdim=True)
        x = x * torch.sigmoid(g)
        return self.head(x.mean(dim=(2, 3)))


class AttnNet(nn.Module):
    """layer_norm, linear, reshape, transpose, matmul (transpose_x / transpose_y, ranks 3–5), softmax,
    split, concat, slice_by_index (strided, squeezed), squeeze / expand_dims, stack, sub, mul by
    scalar, reduce_mean over the last axis."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.bn = nn.BatchNorm1d(dim)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):                       # x: 1×16×4×4 → tokens 1×16×16
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)        # 1×16 tokens×16
        y = self.norm(t)
        qkv = self.qkv(y).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]        # 5-d slices with squeeze
        attn = (q * 0.25) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(b, h * w, c)
        t = t + self.proj(o)
        t = t + self.bn(t.transpose(1, 2)).transpose(1, 2)     # rank-3 batch_norm
        # channel attention (transpose_x) on the other branch
        ca = (t.transpose(1, 2) @ t) * 0.1      # 1×16×16
        t = t + (ca.softmax(-1) @ t.transpose(1, 2)).transpose(1, 2)
        t1, t2, t3 = torch.split(t, [4, 4, 8], dim=-1)
        t = torch.cat([t3, t1 - t2, t2], dim=-1)
        s = t[:, ::2, 1::3]                     # strided slice
        m = s.mean(-1)                          # reduce over the last axis
        e = m.unsqueeze(-1) - m.unsqueeze(1)[:, :, :1].transpose(1, 2)
        z = torch.stack([e.squeeze(-1), m], dim=-1)
        return self.norm2(t).mean(1), z


class GridNet(nn.Module):
    """resample (grid_sample) in the combinations torch can express: bilinear / nearest, zeros /
    border / reflection padding, align_corners both ways; the grid built with add on a constant."""

    def __init__(self):
        super().__init__()
        self.off = nn.Conv2d(4, 2, 1)

    def forward(self, x):                       # 1×4×6×6
        off = torch.tanh(self.off(x)).permute(0, 2, 3, 1) * 0.6
        base = torch.stack(torch.meshgrid(torch.linspace(-1.2, 1.2, 6), torch.linspace(-1.2, 1.2, 6),
                                          indexing="xy"), dim=-1)[None]
        g = base + off
        outs = []
        for mode in ("bilinear", "nearest"):
            for pad in ("zeros", "border", "reflection"):
                for ac in (True, False):
                    if mode == "nearest" and pad != "zeros":
                        continue
                    outs.append(F.grid_sample(x, g, mode=mode, padding_mode=pad, align_corners=ac))
        return torch.cat(outs, dim=1)


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    d = tmp_path_factory.mktemp("coreml_runner")
    torch.manual_seed(0)
    out = {}
    specs = {"conv": (ConvNet(), torch.randn(1, 3, 16, 16)),
             "attn": (AttnNet(), torch.randn(1, 16, 4, 4)),
             "grid": (GridNet(), torch.randn(1, 4, 6, 6))}
    for name, (m, x) in specs.items():
        out[name] = (m.eval(), x, _convert(m, x, d / f"{name}.mlpackage"))
    m, x, _ = out["conv"]
    out["conv16"] = (m, x, _convert(m, x, d / "conv16.mlpackage", precision="fp16"))
    return out


def _run(path, x, **kw):
    r = load(path)
    res = r({r.inputs[0]["name"]: x.numpy()}, **kw)
    return r, res


@pytest.mark.parametrize("name", ["conv", "attn", "grid"])
def test_fp32_programs_match_torch(pkgs, name):
    m, x, path = pkgs[name]
    r, res = _run(path, x)
    assert r.precision == "fp32"
    with torch.no_grad():
        ref = m(x)
    ref = ref if isinstance(ref, tuple) else (ref,)
    outs = [res[o["name"]] for o in r.outputs]
    assert len(outs) == len(ref)
    for got, want in zip(outs, ref):
        assert got.dtype == np.float32 and got.shape == tuple(want.shape)
        assert _rel(got, want.numpy()) <= RTOL, (name, _rel(got, want.numpy()))


def test_programs_cover_the_zoo_ops(pkgs, compressed, mil_program):
    seen = set(load(mil_program[0]).op_types)
    for _, _, path in pkgs.values():
        seen |= set(load(path).op_types)
    seen |= set(compressed["int8"][1].op_types) | set(compressed["lut4"][1].op_types)
    seen |= {"classify", "cast"}   # the classifier test's program
    missing = ZOO_OPS - seen
    assert not missing, f"zoo ops not exercised by these tests: {sorted(missing)}"
    assert ZOO_OPS <= coreml_runner.SUPPORTED_OPS


def test_fp16_program_rounds_between_ops(pkgs):
    m, x, p16 = pkgs["conv16"]
    _, _, p32 = pkgs["conv"]
    r16, y16 = _run(p16, x)
    _, y32 = _run(p32, x)
    assert r16.precision == "fp16"
    name = r16.outputs[0]["name"]
    with torch.no_grad():
        ref = m(x).numpy()
    err16 = _rel(y16[name], ref)
    assert 1e-5 < err16 < 2e-2, err16               # fp16 storage error, not fp32's and not garbage
    assert not np.array_equal(y16[name], y32[name])
    # every fp16 intermediate really is fp16-representable
    taps = [n for n, d in r16.var_dtypes.items() if d == "fp16"][:5]
    tapped = r16({"x": x.numpy()}, taps=taps)
    for t in taps:
        assert np.array_equal(tapped[t], tapped[t].astype(np.float16).astype(np.float32))


def test_fp16_sampler_coordinates_stay_fp32(tmp_path):
    """An fp16 program whose resample and coordinate ops are kept fp32 (as the project converts
    LITv2): the runner keeps them fp32 because the program declares them so."""
    torch.manual_seed(1)
    m, x = GridNet().eval(), torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        ep = torch.export.export(m, (x,)).run_decompositions({})
    keep = {"resample"}

    def selector(op):
        return op.op_type not in keep and not (op.outputs and any(c.op_type == "resample" and c.coordinates is v
                                                                  for v in op.outputs for c in v.child_ops))
    ml = _quiet(ct.convert, ep, inputs=[ct.TensorType(name="x", shape=tuple(x.shape))], convert_to="mlprogram",
                minimum_deployment_target=ct.target.iOS16,
                compute_precision=ct.transform.FP16ComputePrecision(op_selector=selector))
    ml.save(str(tmp_path / "g16.mlpackage"))
    r = load(tmp_path / "g16.mlpackage")
    assert r.precision == "fp16"
    res_ops = [op for op in r._main.operations if op.op_type == "resample"]
    assert res_ops and all(r.var_dtypes[op.outputs[0].name] == "fp32" for op in res_ops)
    coords = res_ops[0].inputs["coordinates"].name
    out = r({"x": x.numpy()}, taps=[coords])
    assert not np.array_equal(out[coords], out[coords].astype(np.float16).astype(np.float32))
    with torch.no_grad():
        ref = m(x).numpy()
    assert _rel(out[r.outputs[0]["name"]], ref) < 2e-2


def test_image_classifier(tmp_path):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval()

    class WithSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return torch.softmax(self.net(x), dim=-1)

    scale, bias = 1 / 127.5, [-1.0, -0.8, -0.6]
    x = torch.rand(1, 3, 8, 8) * 255
    path = _convert(WithSoftmax(), x, tmp_path / "cls.mlpackage",
                    inputs=[ct.ImageType(name="image", shape=(1, 3, 8, 8), scale=scale, bias=bias,
                                         color_layout=ct.colorlayout.BGR)],
                    classifier_config=ct.ClassifierConfig(["cat", "dog", "emu"]))
    r = load(path)
    assert r.classifier and r.labels == ["cat", "dog", "emu"]
    (inp,) = r.inputs
    assert inp["kind"] == "image" and inp["color_layout"] == "BGR" and inp["shape"] == [1, 3, 8, 8]
    assert inp["scale"] == pytest.approx(scale) and inp["bias"] == pytest.approx(bias)
    label_name, probs_name = r.description.predictedFeatureName, r.description.predictedProbabilitiesName
    assert [o["name"] for o in r.outputs] == [label_name, probs_name]
    assert r.logits_var is not None
    xs = torch.rand(2, 3, 8, 8) * 255      # a batch of 2 through a batch-1 program
    res = r({"image": xs.numpy()}, taps=[r.logits_var])
    with torch.no_grad():
        logits = net(xs * scale + torch.tensor(bias).view(1, 3, 1, 1)).numpy()
    probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
    assert res[probs_name].shape == (2, 3) and res[probs_name].dtype == np.float32
    assert _rel(res[probs_name], probs) <= RTOL and _rel(res[r.logits_var], logits) <= RTOL
    assert list(res[label_name]) == [r.labels[i] for i in probs.argmax(1)]
    one = r.predict({"image": xs[0].numpy()})
    assert one[label_name] == res[label_name][0]
    assert set(one[probs_name]) == set(r.labels)
    assert one[probs_name][r.labels[0]] == pytest.approx(float(probs[0, 0]), rel=1e-5)


def test_unknown_op_is_one_line(pkgs, monkeypatch):
    _, _, path = pkgs["conv"]
    monkeypatch.delitem(coreml_runner._IMPLS, "conv_transpose")
    with pytest.raises(UnsupportedOp) as e:
        load(path)
    msg = str(e.value)
    assert isinstance(e.value, EdgeExportError)
    assert "\n" not in msg and "'conv_transpose'" in msg and e.value.op_name in msg


def test_unknown_tap_and_bad_input(pkgs):
    _, x, path = pkgs["attn"]
    r = load(path)
    with pytest.raises(EdgeExportError, match="no var named"):
        r({"x": x.numpy()}, taps=["nope"])
    with pytest.raises(EdgeExportError, match="missing input"):
        r({})
    with pytest.raises(EdgeExportError, match="shape"):
        r({"x": np.zeros((1, 16, 4, 5), np.float32)})


def test_weights_come_from_the_weight_file(pkgs, tmp_path):
    _, x, path = pkgs["conv"]
    copy = tmp_path / "flipped.mlpackage"
    shutil.copytree(path, copy)
    blob = copy / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(blob.read_bytes())
    # the largest weight's data: its blob offset comes from the spec (coremltools' reader)
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    best = None
    ops = [op for blk in spec.mlProgram.functions["main"].block_specializations.values() for op in blk.operations]
    for op in ops:
        if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
            off = op.attributes["val"].blobFileValue.offset
            size = int.from_bytes(data[off + 8:off + 16], "little")
            start = int.from_bytes(data[off + 16:off + 24], "little")
            if best is None or size > best[1]:
                best = (start, size)
    start, size = best
    data[start + size // 2 + 3 - (size // 2) % 4] ^= 0x3F     # the exponent byte of one fp32 weight
    blob.write_bytes(bytes(data))
    _, a = _run(path, x)
    _, b = _run(copy, x)
    name = next(iter(a))
    assert not np.allclose(a[name], b[name])


# --- MIL ops against their own value_inference, attribute combinations --------------------------------

def _mil_cases():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    lw = rng.standard_normal((5, 8)).astype(np.float32)
    cases = {
        "reshape": lambda x: mb.reshape(x=x, shape=[1, 3, 64]),
        "reshape_infer": lambda x: mb.reshape(x=x, shape=[0, 3, -1, 8]),
        "transpose": lambda x: mb.transpose(x=x, perm=[0, 2, 3, 1]),
        "transpose5": lambda x: mb.transpose(x=mb.reshape(x=x, shape=[1, 3, 4, 4, 4]), perm=[2, 0, 3, 1, 4]),
        "slice_mask": lambda x: mb.slice_by_index(x=x, begin=[0, 1, 0, 1], end=[1, 3, 8, 7], stride=[1, 1, 2, 3],
                                                  end_mask=[False, True, True, False]),
        "slice_squeeze": lambda x: mb.slice_by_index(x=x, begin=[0, 2, 0, 0], end=[1, 3, 4, 4],
                                                     squeeze_mask=[True, True, False, False]),
        "slice_neg": lambda x: mb.slice_by_index(x=x, begin=[0, 0, -1, 0], end=[1, 3, 0, 4], stride=[1, 1, -2, 1],
                                                 end_mask=[False, False, True, False]),
        "slice_by_size": lambda x: mb.slice_by_size(x=x, begin=[0, 1, 2, 0], size=[1, 2, -1, 3]),
        "split_sizes": lambda x: mb.split(x=x, split_sizes=[1, 2], axis=1)[1],
        "split_num": lambda x: mb.split(x=x, num_splits=2, axis=-1)[0],
        "concat": lambda x: mb.concat(values=[x, mb.mul(x=x, y=2.0)], axis=1),
        "concat_interleave": lambda x: mb.concat(values=[x, mb.mul(x=x, y=-1.0)], axis=2, interleave=True),
        "stack": lambda x: mb.stack(values=[x, mb.add(x=x, y=1.0)], axis=-1),
        "squeeze": lambda x: mb.squeeze(x=mb.reduce_mean(x=x, axes=[1], keep_dims=True), axes=[1]),
        "expand_dims": lambda x: mb.expand_dims(x=mb.reduce_mean(x=x, axes=[2, 3]), axes=[-1, 0]),
        "reduce_mean": lambda x: mb.reduce_mean(x=x, axes=[2, 3], keep_dims=False),
        "reduce_mean_all": lambda x: mb.reduce_mean(x=x, keep_dims=True),
        "reduce_sum": lambda x: mb.reduce_sum(x=x, axes=[-1], keep_dims=True),
        "reduce_max": lambda x: mb.reduce_max(x=x, axes=[1]),
        "softmax": lambda x: mb.softmax(x=x, axis=1),
        "layer_norm_c": lambda x: mb.layer_norm(x=x, axes=[1], gamma=np.array([1.0, 2.0, 0.5], np.float32),
                                                beta=np.array([0.0, 0.1, -0.1], np.float32), epsilon=1e-5),
        "layer_norm_hw": lambda x: mb.layer_norm(x=x, axes=[-2, -1], epsilon=1e-6),
        "tile": lambda x: mb.tile(x=x, reps=[1, 2, 1, 2]),
        "pad_const": lambda x: mb.pad(x=x, pad=[1, 0, 2, 1], mode="constant", constant_val=0.5),
        "pad_reflect": lambda x: mb.pad(x=x, pad=[0, 0, 0, 0, 1, 2, 2, 1], mode="reflect"),
        "pad_replicate": lambda x: mb.pad(x=x, pad=[1, 1, 0, 2], mode="replicate"),
        "gather": lambda x: mb.gather(x=x, indices=np.array([[2, 0], [1, 1]], np.int32), axis=2),
        "gather_along_axis": lambda x: mb.gather_along_axis(x=x, indices=np.zeros((1, 3, 2, 8), np.int32) + 3,
                                                            axis=2),
        "cast_int": lambda x: mb.cast(x=mb.cast(x=mb.mul(x=x, y=3.0), dtype="int32"), dtype="fp32"),
        "cast_bool": lambda x: mb.cast(x=mb.greater(x=x, y=0.0), dtype="fp32"),
        "select": lambda x: mb.select(cond=mb.less(x=x, y=0.2), a=x, b=mb.mul(x=x, y=0.5)),
        "real_div": lambda x: mb.real_div(x=x, y=np.float32(3.0)),
        "pow_sqrt": lambda x: mb.sqrt(x=mb.add(x=mb.square(x=x), y=1.0)),
        "rsqrt_inverse": lambda x: mb.inverse(x=mb.rsqrt(x=mb.add(x=mb.abs(x=x), y=1.0)), epsilon=1e-3),
        "clip": lambda x: mb.clip(x=x, alpha=-0.5, beta=0.5),
        "maximum": lambda x: mb.maximum(x=x, y=mb.mul(x=x, y=-1.0)),
        "activations": lambda x: mb.add(x=mb.relu(x=x), y=mb.add(x=mb.sigmoid(x=x), y=mb.tanh(x=x))),
        "hard": lambda x: mb.mul(x=x, y=mb.sigmoid_hard(x=x, alpha=1 / 6, beta=0.5)),
        "thresholded": lambda x: mb.thresholded_relu(x=mb.mul(x=x, y=3.0), alpha=-1.0),
        "leaky_elu": lambda x: mb.add(x=mb.leaky_relu(x=x, alpha=0.1), y=mb.elu(x=x, alpha=0.7)),
        "matmul_t": lambda x: mb.matmul(x=x, y=x, transpose_x=True),
        "matmul_ty": lambda x: mb.matmul(x=x, y=x, transpose_y=True),
        "linear": lambda x: mb.linear(x=x, weight=lw,
                                      bias=np.arange(5, dtype=np.float32)),
        "batch_norm": lambda x: mb.batch_norm(x=x, mean=np.array([0.1, 0.2, 0.3], np.float32),
                                              variance=np.array([1.0, 2.0, 0.5], np.float32),
                                              gamma=np.array([1.0, -1.0, 2.0], np.float32),
                                              beta=np.array([0.0, 0.5, 1.0], np.float32), epsilon=1e-3),
        "conv_same": lambda x: mb.conv(x=mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[1, 2, 8, 8]),
                                       weight=w, pad_type="same", strides=[2, 2]),
    }
    return cases


# concat's value_inference ignores interleave: that case is checked against MIL's documented semantics
_VALUE_INFERENCE_WRONG = {"concat_interleave"}
# independent references (torch / numpy), checked in addition to value_inference where it exists
_TORCH_REFS = {"concat_interleave", "conv_same", "linear", "batch_norm", "layer_norm_c", "layer_norm_hw",
               "activations", "hard", "leaky_elu", "pad_reflect", "pad_replicate"}


def _torch_reference(name, x):
    """References for the ops coremltools gives no value_inference for (torch / numpy)."""
    t = torch.from_numpy(x)
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((6, 2, 3, 3)).astype(np.float32))
    if name == "concat_interleave":     # output[:, :, 0::2] = x, output[:, :, 1::2] = -x (MIL's docs)
        out = np.zeros((1, 3, 16, 8), np.float32)
        out[:, :, 0::2], out[:, :, 1::2] = x, -x
        return out
    if name == "conv_same":     # same padding of 8 with stride 2, kernel 3: 0 before, 1 after
        return F.conv2d(F.pad(t[:, :2], [0, 1, 0, 1]), w, stride=2).numpy()
    if name == "linear":
        lw = torch.from_numpy(rng.standard_normal((5, 8)).astype(np.float32))
        return F.linear(t, lw, torch.arange(5, dtype=torch.float32)).numpy()
    if name == "batch_norm":
        m, v = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1.0, 2.0, 0.5])
        g, b = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.0, 0.5, 1.0])
        return ((t - m.view(1, 3, 1, 1)) / torch.sqrt(v.view(1, 3, 1, 1) + 1e-3) * g.view(1, 3, 1, 1)
                + b.view(1, 3, 1, 1)).numpy()
    if name == "layer_norm_c":
        y = (t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, keepdim=True, unbiased=False) + 1e-5)
        return (y * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([0.0, 0.1, -0.1]).view(1, 3, 1, 1)
                ).numpy()
    if name == "layer_norm_hw":
        return F.layer_norm(t, (8, 8), eps=1e-6).numpy()
    if name == "activations":
        return (torch.relu(t) + torch.sigmoid(t) + torch.tanh(t)).numpy()
    if name == "hard":
        return F.hardswish(t).numpy()
    if name == "leaky_elu":
        return (F.leaky_relu(t, 0.1) + F.elu(t, 0.7)).numpy()
    if name == "pad_reflect":
        return F.pad(t, [2, 1, 1, 2], mode="reflect").numpy()
    if name == "pad_replicate":
        return F.pad(t, [0, 2, 1, 1], mode="replicate").numpy()
    raise KeyError(name)


@pytest.fixture(scope="module")
def mil_program(tmp_path_factory):
    """One saved program: every case applied to the input x (1×3×8×8), each its own output; the
    reference value is the same op built on a constant x, evaluated by coremltools' value_inference."""
    cases = _mil_cases()
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    refs = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 8, 8))], opset_version=ct.target.iOS16)
    def reference(x_in):   # the same ops on a constant x: coremltools evaluates them as it builds them
        for name, build in cases.items():
            if name not in _VALUE_INFERENCE_WRONG:
                refs[name] = build(mb.const(val=x)).val
        return x_in

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 8, 8))], opset_version=ct.target.iOS16)
    def prog(x_in):
        return tuple(mb.identity(x=build(x_in), name=f"out_{name}") for name, build in cases.items())

    ml = _quiet(ct.convert, prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY)
    path = tmp_path_factory.mktemp("mil") / "ops.mlpackage"
    ml.save(str(path))
    return path, x, refs, cases


def test_mil_ops_match_value_inference(mil_program):
    path, x, refs, cases = mil_program
    r = load(path)
    out = r({r.inputs[0]["name"]: x})
    by_name = {o["name"]: o["name"] for o in r.outputs}
    bad, by_vi = [], 0
    for name in cases:
        got = out[by_name[f"out_{name}"]]
        wants = []
        if refs.get(name) is not None:
            wants.append(("value_inference", refs[name]))
            by_vi += 1
        if name in _TORCH_REFS:
            wants.append(("torch", _torch_reference(name, x)))
        assert wants, name
        for what, want in wants:
            want = np.asarray(want, np.float32)
            if got.shape != want.shape or _rel(got, want) > RTOL:
                err = _rel(got, want) if got.shape == want.shape else "-"
                bad.append(f"{name} vs {what}: shape {got.shape} vs {want.shape}, err {err}")
    assert by_vi >= len(cases) - 3
    assert not bad, bad


def _resample_case_prog(coords, mode, pmode, cmode, ac):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 5, 6))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.resample(x=x, coordinates=coords, sampling_mode=mode, padding_mode=pmode, padding_value=0.25,
                           coordinates_mode=cmode, align_corners=ac)
    return prog


@pytest.mark.parametrize("cmode,ac,pmode", [
    ("normalized_minus_one_to_one", True, "constant"), ("normalized_minus_one_to_one", False, "border"),
    ("normalized_zero_to_one", False, "reflection"), ("unnormalized", False, "symmetric"),
    ("normalized_minus_one_to_one", False, "reflection"), ("normalized_minus_one_to_one", True, "symmetric")])
def test_resample_modes(cmode, ac, pmode):
    """MIL resample's coordinate modes and padding modes against a direct numpy reference."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 5, 6)).astype(np.float32)
    c = rng.uniform(-1.4, 1.4, size=(1, 3, 4, 2)).astype(np.float32)
    if cmode == "normalized_zero_to_one":
        c = (c + 1) / 2
    elif cmode == "unnormalized":
        c = (c + 1) / 2 * np.array([5, 4], np.float32)
    prog = _resample_case_prog(c, "bilinear", pmode, cmode, ac)
    op = [o for o in prog.functions["main"].operations if o.op_type == "resample"][0]
    npc = {v.name: v.val for v in op.inputs.values() if v.val is not None}
    consts = {n: torch.from_numpy(np.asarray(v)) for n, v in npc.items() if np.asarray(v).dtype.kind in "fiub"}
    view = coreml_runner._OpView(op, consts, npc)
    fn = coreml_runner._IMPLS["resample"](view)
    env = dict(consts)
    env[op.inputs["x"].name] = torch.from_numpy(x)
    got = fn([env[n] for n in view.refs]).numpy()   # the op's kernel, on a program built in memory
    assert _rel(got, _np_resample(x, c, pmode, 0.25, cmode, ac)) <= 1e-5


def _np_resample(x, c, pmode, pval, cmode, ac):
    _, C, H, W = x.shape
    out = np.zeros((1, C, c.shape[1], c.shape[2]), np.float64)
    size = np.array([W, H], np.float64)
    c = c.astype(np.float64)
    if cmode == "normalized_zero_to_one":
        c = c * 2 - 1
    if cmode == "unnormalized":
        p = c
    else:
        p = (c + 1) / 2 * (size - 1) if ac else ((c + 1) * size - 1) / 2

    def fold(v, n):
        if pmode == "reflection":            # about the edge pixels' centres, period 2(n-1)
            per = 2 * (n - 1)
            v = np.abs(np.mod(v, per))
            return per - v if v > n - 1 else v
        if pmode == "symmetric":             # about the edges, period 2n
            per = 2 * n
            v = np.mod(v + 0.5, per)
            v = per - v if v > n else v
            return min(max(v - 0.5, 0), n - 1)
        return v

    for i in range(c.shape[1]):
        for j in range(c.shape[2]):
            px, py = p[0, i, j]
            if pmode in ("reflection", "symmetric"):
                px, py = fold(px, W), fold(py, H)
            if pmode == "border":
                px, py = min(max(px, 0), W - 1), min(max(py, 0), H - 1)
            x0, y0 = int(np.floor(px)), int(np.floor(py))
            acc = np.zeros(C)
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < H and 0 <= xx < W:
                        v = x[0, :, yy, xx]
                    elif pmode == "constant":
                        v = np.full(C, pval)
                    else:
                        v = x[0, :, min(max(yy, 0), H - 1), min(max(xx, 0), W - 1)]
                    acc += wy * wx * v
            out[0, :, i, j] = acc
    return out


# --- compressed weights -------------------------------------------------------------------------

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OpMagnitudePrunerConfig, OpPalettizerConfig,
                                             OptimizationConfig, linear_quantize_weights, palettize_weights,
                                             prune_weights)
    d = tmp_path_factory.mktemp("compressed")
    torch.manual_seed(4)
    m, x = Small().eval(), torch.randn(1, 8, 6, 6)
    out = {"model": (m, x)}
    for target in ("iOS16", "iOS18"):
        base = _convert(m, x, d / f"float_{target}.mlpackage", precision="fp16", target=getattr(ct.target, target))
        ml = ct.models.MLModel(str(base), skip_model_load=True)
        out[f"float_{target}"] = (base, load(base))
        if target == "iOS16":
            variants = {
                "int8": lambda: linear_quantize_weights(ml, OptimizationConfig(OpLinearQuantizerConfig(
                    mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=256))),
                "uint8": lambda: linear_quantize_weights(ml, OptimizationConfig(OpLinearQuantizerConfig(
                    mode="linear", dtype="uint8", granularity="per_tensor", weight_threshold=256))),
                "lut4": lambda: palettize_weights(ml, OptimizationConfig(OpPalettizerConfig(
                    mode="uniform", nbits=4, granularity="per_tensor", weight_threshold=256))),
                "lut6": lambda: palettize_weights(ml, OptimizationConfig(OpPalettizerConfig(
                    mode="uniform", nbits=6, weight_threshold=256))),
            }
        else:
            variants = {
                "int4_block": lambda: linear_quantize_weights(ml, OptimizationConfig(OpLinearQuantizerConfig(
                    mode="linear", dtype="int4", granularity="per_block", block_size=8, weight_threshold=256))),
                "lut_grouped": lambda: palettize_weights(ml, OptimizationConfig(OpPalettizerConfig(
                    mode="uniform", nbits=2, granularity="per_grouped_channel", group_size=8, weight_threshold=256))),
                "sparse": lambda: prune_weights(ml, OptimizationConfig(OpMagnitudePrunerConfig(
                    target_sparsity=0.5, weight_threshold=256))),
            }
        for name, make in variants.items():
            p = d / f"{name}.mlpackage"
            _quiet(make).save(str(p))
            out[name] = (p, load(p))
    return out


@pytest.mark.parametrize("name", ["int8", "uint8", "lut4", "lut6", "int4_block", "lut_grouped", "sparse"])
def test_compressed_weights(compressed, name):
    from coremltools.converters.mil.frontend.milproto import load as milload
    path, r = compressed[name]
    m, x = compressed["model"]
    kinds = {t for t in r.op_types if t.startswith("constexpr_")}
    assert kinds, r.op_types
    # every decompressed constant equals coremltools' own decompression of the op
    mlm = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlm.get_spec()
    prog = _quiet(milload.load, spec, spec.specificationVersion, mlm.weights_dir)
    checked = 0
    for op in prog.functions["main"].operations:
        if op.op_type.startswith("constexpr_") and not any(c.op_type.startswith("constexpr_")
                                                            for v in op.outputs for c in v.child_ops):
            want = op.materialized_val_inference()
            want = want[-1] if isinstance(want, tuple) else want
            got = r._consts[op.outputs[-1].name].numpy()
            np.testing.assert_array_equal(got, np.asarray(want).astype(np.float32))
            checked += 1
    assert checked >= 2
    # and the program still computes the model, within compression + fp16 error
    target = "iOS18" if name in ("int4_block", "lut_grouped", "sparse") else "iOS16"
    base = compressed[f"float_{target}"][1]
    y = r({"x": x.numpy()})[r.outputs[0]["name"]]
    y0 = base({"x": x.numpy()})[base.outputs[0]["name"]]
    with torch.no_grad():
        ref = m(x).numpy()
    assert not np.array_equal(y, y0)
    assert _rel(y, ref) < (0.6 if name in ("lut_grouped", "sparse", "int4_block") else 0.15), _rel(y, ref)


def test_unpack_bits_matches_coremltools():
    from coremltools.optimize import _utils as ou
    rng = np.random.default_rng(5)
    for nbits in (1, 2, 3, 4, 6, 8):
        vals = rng.integers(0, 2 ** nbits, size=37).astype(np.uint8)
        packed = ou.pack_elements_into_bits(vals, nbits)
        np.testing.assert_array_equal(coreml_runner._unpack_bits(packed, nbits, 37), vals)
