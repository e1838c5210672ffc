"""`edgevit-export inspect`: the mobile-unfriendliness report, before and after the passes."""

import json

import pytest


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


def test_inspect_table_and_bad_input(cli):
    res = cli("inspect", "shvit_s1", "--res", "64")
    assert res.exit_code == 0 and "reshape/view ops" in res.output and "Apple" in res.output
    assert cli("inspect", "shvit_s1", "--format", "tflite").exit_code == 2
    assert cli("inspect", "shvit_s1", "--res", "30").exit_code == 2


def _every():
    from edgevit_export.registry import list_models

    return [(n, f) for n in list_models() for f in ("onnx", "coreml")]


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", _every())
def test_inspect_every_model_and_format(cli, name, fmt):
    res = cli("inspect", name, "--format", fmt, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["after"]["max_rank"] <= 5
