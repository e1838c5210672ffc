"""ExecuTorch (.pte, XNNPACK): the delegation passes on small graphs, lowering before/after, the
saved program in ExecuTorch's runtime against PyTorch, and the one-line errors."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgevit_export.passes import PassContext, resolve_passes, run_passes

aten = torch.ops.aten


def _rewrite(module, x, names):
    module.eval()
    r = run_passes(torch.export.export(module, (x,)), names, PassContext((x,)))
    refused = [(p.name, p.refused) for p in r.passes if p.refused]
    assert not refused, refused
    with torch.no_grad():
        a, b = r.program.module()(x), module(x)
    assert (a - b).abs().max() / b.abs().max() <= 1e-5
    return r


def _ops(r) -> dict:
    return r.after.by_op


class Attention(nn.Module):
    """The shapes the zoo's attention blocks use: fused qkv split four ways, LayerNorm, GroupNorm,
    4-D q @ kᵀ, token mean, an integer divisor, hardsigmoid and a constant grid from arange."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(c)
        self.gn = nn.GroupNorm(1, c)
        self.gn4 = nn.GroupNorm(4, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.conv = nn.Conv2d(c, c, 1)
        self.bias_table = nn.Parameter(torch.randn(heads, 7))
        self.register_buffer("idx", torch.randint(0, 7, (16, 16)), persistent=False)
        with torch.no_grad():   # affines away from identity so a dropped one shows
            for m in (self.norm, self.gn, self.gn4):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)

    def forward(self, x):                               # x: (B, C, 4, 4)
        b, c, h, w = x.shape
        x = self.gn4(self.gn(x))
        t = self.norm(x.flatten(2).transpose(1, 2))     # (B, N, C)
        q, k, v = self.qkv(t).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) + self.bias_table[:, self.idx]
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, h * w, c)
        a, rest = y.split([4, c - 4], dim=-1)
        c1, c2 = rest.chunk(2, dim=-1)
        y = torch.cat([a, c1, c2], -1)[0]               # select on the batch dim
        grid = torch.arange(h * w, dtype=torch.float32).reshape(1, h * w, 1) / (h * w)
        y = y.unsqueeze(0) + grid
        m = self.conv(y.transpose(1, 2).reshape(b, c, h, w))
        return F.hardsigmoid(m).mean((2, 3)) + y.mean(1) / 2


X = torch.randn(1, 16, 4, 4)


def test_split_to_slices():
    r = _rewrite(Attention(), X, ["split_to_slices"])
    assert not {"split_with_sizes", "split", "chunk", "unbind", "select"} & set(_ops(r))
    assert _ops(r)["slice"] >= 6


def test_matmul_to_bmm():
    r = _rewrite(Attention(), X, ["matmul_to_bmm"])
    assert "matmul" not in _ops(r) and _ops(r)["bmm"] == 2


def test_decompose_norms_layer_and_group_norm():
    r = _rewrite(Attention(), X, ["decompose_norms"])
    assert not {"layer_norm", "group_norm"} & set(_ops(r))
    assert _ops(r)["sqrt"] == 3 and "rsqrt" not in _ops(r)     # NNAPI has no Reciprocal


def test_mean_as_gemm():
    r = _rewrite(Attention(), X, ["mean_as_gemm"])
    means = [n for n in r.program.graph.nodes if n.target is aten.mean.dim]
    # the pooled mean kept as a 4-D global average pool with keepdim; the token mean is a product
    assert len(means) == 1 and means[0].args[1] == [2, 3] and means[0].args[2] is True


def test_fold_constants_folds_the_bias_gather_and_the_grid():
    r = _rewrite(Attention(), X, ["fold_constants"])
    assert not {"index", "arange"} & set(_ops(r))


def test_float_scalars():
    r = _rewrite(Attention(), X, ["float_scalars"])
    assert "hardsigmoid" not in _ops(r)
    ints = [n for n in r.program.graph.nodes if n.target in (aten.div.Tensor, aten.mul.Tensor, aten.add.Tensor)
            and any(type(a) is int for a in n.args)]
    assert not ints


pte = pytest.importorskip("edgevit_export.exporters.pte")


def _lowered(module, names):
    r = _rewrite(module, X, names)
    return pte.report(r.program, X)["detail"]


@pytest.mark.slow   # ~20-30 s (tier trimmed for the 15-minute budget)
def test_the_pte_pipeline_takes_everything_into_one_xnnpack_delegate():
    plain = _lowered(Attention(), [])
    assert plain["delegate_subgraphs"] > 1 and plain["nodes_portable"] > 0
    assert {"native_layer_norm", "native_group_norm"} <= set(plain["portable_by_op"])
    after = _lowered(Attention(), resolve_passes("default", "pte"))
    assert after["delegate_subgraphs"] == 1, after["portable_by_op"]
    assert after["nodes_portable"] == 0 and after["mac_share_delegated"] == 1.0


@pytest.fixture
def exported(pte_s1_64):
    return pte_s1_64


def test_export_pte_runs_in_executorch_and_matches_pytorch(exported):
    r = exported
    assert r.passed, r.checks
    assert r.artifact.suffix == ".pte" and r.artifact.is_file()
    assert r.checks["parity"]["max_rel"] <= 1e-4 and "ExecuTorch" in r.checks["parity"]["reference"]
    d = json.loads(r.manifest_path.read_text())["backend"]["delegation"]
    assert d["delegate_subgraphs"] == 1 and d["nodes_portable"] == 0 and d["mac_share_delegated"] == 1.0
    assert d["macs_delegated"] > 0.9 * r.manifest["macs"]          # every conv/linear/bmm is inside


def test_pte_check_and_run(exported, cli):
    from edgevit_export import api

    rep = api.check(exported.artifact)
    assert rep.passed and rep.sha256_matches and "ExecuTorch" in rep.runtime
    res = cli("run", exported.artifact, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["outputs"][0]["shape"] == [1, 1000] and len(out["predictions"][0]["top"]) == 5


def test_a_corrupted_pte_fails_its_check(exported, tmp_path):
    import shutil

    from edgevit_export import api

    bad = tmp_path / exported.artifact.name
    for f in (exported.artifact, exported.manifest_path, exported.manifest_path.with_suffix(".golden.npz")):
        shutil.copy(f, tmp_path / f.name)
    data = bytearray(bad.read_bytes())
    # flip weights in the middle of the file: the delegate's constant data
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    bad.write_bytes(bytes(data))
    rep = api.check(bad)
    assert not rep.passed and not rep.sha256_matches


def test_pte_output_path_and_missing_executorch(cli, tmp_path, monkeypatch):
    res = cli("export", "shvit_s1", "--format", "pte", "--res", "64", "--output", tmp_path / "m.onnx")
    assert res.exit_code == 2 and "must end in .pte" in res.output
    for mod in ("executorch", "executorch.exir", "executorch.runtime"):
        monkeypatch.setitem(sys.modules, mod, None)
    res = cli("export", "shvit_s1", "--format", "pte", "--res", "64", "--out", tmp_path)
    assert res.exit_code == 2 and "pip install" in res.output and "executorch" in res.output
    assert "Traceback" not in res.output and not list(tmp_path.iterdir())


def test_views_as_reshape():
    r = _rewrite(Attention(), X, ["views_as_reshape"])
    assert not {"unsqueeze", "squeeze"} & set(_ops(r))


def test_batchnorm_as_affine_takes_the_bns_no_conv_absorbs():
    class PreNorm(nn.Module):       # EdgeViT's shape: BN opening a block, before a padded conv; BN on 2-D
        def __init__(self):
            super().__init__()
            self.bn, self.conv, self.bn1 = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm1d(16)
            for bn in (self.bn, self.bn1):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)

        def forward(self, x):
            return self.bn1(self.conv(self.bn(x)).mean((2, 3)))

    r = _rewrite(PreNorm(), X, ["fold_batchnorm", "batchnorm_as_affine"])
    assert not {"batch_norm", "_native_batch_norm_legit_no_training"} & set(_ops(r))


class TalkingHeads(nn.Module):
    """EfficientFormerV2's talking-head attention: a 1×1 conv across heads, softmax over the keys,
    another 1×1 conv; XNNPACK keeps the conv output channels-last through the softmax."""

    def __init__(self, heads=8):
        super().__init__()
        self.th1, self.th2 = nn.Conv2d(heads, heads, 1), nn.Conv2d(heads, heads, 1)

    def forward(self, x):
        return self.th2(self.th1(x).softmax(dim=-1))


def _pte_error(module, x, names, tmp_path) -> float:
    r = _rewrite(module, x, names)
    path = tmp_path / f"m{len(names)}.pte"
    path.write_bytes(pte.lower(r.program).to_executorch().buffer)
    out = pte.load(path, threads=1)({"images": x.numpy()})["logits"]
    with torch.no_grad():
        ref = module(x).numpy()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_softmax_after_a_conv_is_computed_over_the_right_axis(tmp_path):
    """ExecuTorch 1.5 normalises a channels-last softmax over the channels; softmax_rows makes the
    delegate compute it on NCHW rows again (measured on the whole EfficientFormerV2-S1 at 512:
    2.9e-4 → 7e-7; its attention alone: 0.79 → 1.7e-6)."""
    x = torch.randn(1, 8, 49, 49, generator=torch.Generator().manual_seed(0))
    assert _pte_error(TalkingHeads(), x, ["softmax_rows"], tmp_path) < 1e-5
    assert _pte_error(TalkingHeads(), x, [], tmp_path) > 0.1    # without it: the wrong axis
