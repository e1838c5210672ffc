"""The CLI at 80 columns: every command's --help and normal output fit, and no value a user must
copy (a node name, a module path, a column header) is cut by a table."""

import pytest
from helpers import assert_fits_80

from edgevit_export.cli import app


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    return sorted(group.commands)


@pytest.mark.parametrize("command", ["", *_commands()])
def test_help_fits_80_columns(cli80, command):
    res = cli80(*([command] if command else []), "--help")
    assert res.exit_code == 0, res.output
    assert_fits_80(res.output)
    assert "<bool>" not in res.output


@pytest.mark.parametrize("args", [
    ("list",),
    ("info", "litv2_s", "--res", "64"),
    ("passes",),
    ("shapes", "{tmp}/s", "--per-class", "1", "--size", "32"),
])
def test_normal_output_fits_80_columns(cli80, tmp_path, args):
    res = cli80(*(a.format(tmp=tmp_path) for a in args))
    assert res.exit_code == 0, res.output
    assert_fits_80(res.stdout)


@pytest.mark.slow   # ~40-70 s; the fast tier renders shvit_s1's inspect at 80 columns (test_inspect)
def test_inspect_names_every_place_whole(cli80):
    """The 'where' of each finding is under the table, whole (it was cut to 'layers.2.blocks.0…')."""
    res = cli80("inspect", "litv2_s", "--res", "64")     # rank-6 window partitions: long module paths
    assert res.exit_code == 0, res.output
    assert_fits_80(res.stdout)
    assert "before: layers.2.blocks.0.attn.h_qkv (1, 2, 2, 2, 2, 192)" in res.stdout
    assert "coremltools: Core ML supports tensors of rank ≤ 5" in res.stdout


def test_bench_and_profile_fit_80_columns(cli80):
    res = cli80("bench", "shvit_s1", "--res", "64", "--runs", "3")
    assert res.exit_code == 0, res.output
    assert_fits_80(res.stdout)
    assert "GFLOP/s" in res.stdout
    res = cli80("profile", "shvit_s1", "--res", "64", "--runs", "2")
    assert res.exit_code == 0, res.output
    assert_fits_80(res.stdout)
