"""`edgevit-export inspect`: the mobile-unfriendliness report, before and after the passes."""

import json

import pytest


@pytest.mark.slow   # rank 6 is named by test_export_coreml; the Core ML op counts by the test below
def test_inspect_litv2_reports_rank6_fixed(cli):
    res = cli("inspect", "litv2_s", "--res", "64", "--format", "coreml", "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    before = {f["what"]: f for f in r["findings_before"]}
    after = {f["what"]: f for f in r["findings_after"]}
    assert before["tensors of rank > 5"]["count"] > 0 and after["tensors of rank > 5"]["count"] == 0
    assert "attn" in before["tensors of rank > 5"]["examples"][0]
    assert r["before"]["max_rank"] == 6 and r["after"]["max_rank"] <= 5
    assert all(f["source"] for f in r["findings_after"])
    assert "compute ops on tensors that are not 4-D channels-first" in after
    # the Core ML program itself: converted before and after the passes, its non-const ops counted
    rt = r["runtime"]
    assert rt["title"].startswith("Core ML program")
    ops = rt["after"]["detail"]["ops"]
    assert rt["after"]["rows"]["non-const ops"] == sum(ops.values()) > 0 and "const" not in ops
    assert ops.get("layer_norm", 0) > 0            # LITv2's LayerNorms stay one op each in Core ML


@pytest.mark.slow   # two Core ML conversions; the inspect table and ORT Mobile partitions run in the fast tier
def test_inspect_coreml_counts_the_programs_ops_before_and_after(cli):
    res = cli("inspect", "shvit_s1", "--res", "64", "--format", "coreml", "--json")
    assert res.exit_code == 0, res.output
    rt = json.loads(res.output)["runtime"]
    assert rt["title"].startswith("Core ML program")
    before, after = rt["before"]["detail"]["ops"], rt["after"]["detail"]["ops"]
    assert rt["after"]["rows"]["non-const ops"] == sum(after.values()) > 0 and "const" not in after
    # GroupNorm is six primitives in Core ML (SHViT-S1: 9 norms); fold_batchnorm removes the head's BN
    assert after["real_div"] >= 9 and after["sqrt"] >= 9
    assert before.get("batch_norm", 0) > after.get("batch_norm", 0)


def test_inspect_table_and_bad_input(cli80):
    """At 80 columns: each finding's 'where' is under the table, whole (test_cli_80 has LITv2's long paths)."""
    from helpers import assert_fits_80

    res = cli80("inspect", "shvit_s1", "--res", "64")
    assert res.exit_code == 0 and "reshape/view ops" in res.output and "Apple" in res.output
    assert_fits_80(res.stdout)
    assert "\n    after: blocks2.3.mixer.m\n" in res.stdout
    # ORT Mobile: onnxruntime's usability checker partitions the ONNX for the phone EPs
    assert "ORT Mobile partitions" in res.output and "NNAPI EP partitions" in res.output
    assert cli80("inspect", "shvit_s1", "--format", "tfl").exit_code == 2
    assert cli80("inspect", "shvit_s1", "--res", "30").exit_code == 2


@pytest.mark.slow   # the same checker numbers are asserted in test_ort_mobile; this adds plain → default
def test_inspect_onnx_reports_ort_mobile_partitions(cli):
    res = cli("inspect", "shvit_s1", "--res", "64", "--json")
    assert res.exit_code == 0, res.output
    rt = json.loads(res.output)["runtime"]
    before, after = rt["before"]["detail"], rt["after"]["detail"]
    # the head's BatchNorm1d is a 2-D BatchNormalization the ML Program EP lacks, until fold_batchnorm
    assert before["coreml_mlprogram"]["unsupported_ops"] == {"BatchNormalization": 1}
    assert before["coreml_mlprogram"]["partitions"] == 2 and after["coreml_mlprogram"]["partitions"] == 1
    # GroupNorm exports as InstanceNormalization, which NNAPI lacks: one cut per norm
    assert after["nnapi"]["unsupported_ops"].get("InstanceNormalization") == 9
    assert after["nnapi"]["partitions"] > 1


@pytest.mark.slow   # before/after delegation is asserted in test_pte on a small graph (two lowerings, not four)
def test_inspect_pte_shows_delegation_before_and_after(cli):
    pytest.importorskip("executorch")
    res = cli("inspect", "mobilenetv3_small_100", "--res", "64", "--format", "pte", "--json")
    assert res.exit_code == 0, res.output
    rt = json.loads(res.output)["runtime"]
    before, after = rt["before"]["detail"], rt["after"]["detail"]
    assert before["portable_by_op"].get("_to_dim_order_copy", 0) > 0          # hardsigmoid's integer constants
    assert after["nodes_portable"] == 0 and after["delegate_subgraphs"] == 1


def _every():
    from edgevit_export.registry import list_models

    return [(n, f) for n in list_models() for f in ("onnx", "coreml")]


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", _every())
def test_inspect_every_model_and_format(cli, name, fmt):
    res = cli("inspect", name, "--format", fmt, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["after"]["max_rank"] <= 5
