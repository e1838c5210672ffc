"""The CLI's surface: --version, names as users type them."""

import pytest


def test_version(cli):
    from edgevit_export import __version__

    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"edgevit-export {__version__}"


@pytest.mark.parametrize("typed", ["shvit_s1", "SHViT_S1", "shvit-s1", " ShViT-S1 ", "shvit_s1.in1k"])
def test_model_names_in_any_case_with_dashes_or_a_timm_tag(cli, typed):
    from edgevit_export.registry import canonical_name

    assert canonical_name(typed) == "shvit_s1"
    r = cli("info", typed, "--res", "64")
    assert r.exit_code == 0 and "\nshvit_s1 — SHViT" in "\n" + r.stdout, r.output


def test_unknown_names_still_suggest(cli):
    r = cli("info", "SHViT_S9")
    assert r.exit_code == 2 and "Did you mean: shvit_s" in r.stderr


def test_format_names_in_any_case():
    from edgevit_export import exporters

    assert exporters.get("ONNX").name == "onnx" and exporters.get("CoreML").name == "coreml"


def test_flags_show_no_value_placeholder_in_help(cli):
    import typer

    from edgevit_export.cli import app

    for name in [None, *typer.main.get_command(app).commands]:
        r = cli(*([name] if name else []), "--help")
        assert r.exit_code == 0, (name, r.output)
        assert "<bool>" not in r.output, name


def test_a_timm_tag_is_explained(cli):
    r = cli("info", "fastvit_t8.apple_in1k", "--res", "64")
    assert r.exit_code == 0
    assert "timm's pretrained tag 'apple_in1k' names weights, not a model — this is fastvit_t8" in r.stdout
    assert "give the checkpoint with --weights FILE" in r.stdout
