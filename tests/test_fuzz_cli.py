"""Property-based fuzzing of every command's arguments (hypothesis).

Each example is one command line: a command, each of its options absent or drawn from a pool of
cheap valid values and hostile ones, and at least one option (or the positional argument) hostile
for sure — an unknown model, a malformed or huge resolution, a number out of range, a missing
path, a file where a folder is expected, an unwritable place, odd characters, an option that does
not exist. The property, for every example: exit 0, 1 or 2, never a traceback; exit 2 prints one
line on stderr, starting ``error:``, and writes nothing (the sandbox tree is unchanged).

The fast tier runs 200 derandomized examples (the same ones every run: no flaky CI);
``make test-all`` runs 10,000 random ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

ODD = "ünï©ødé 'q' $x;"

# Positional arguments and options by name: (cheap valid values, hostile values). Paths are
# written relative to the sandbox (the test's working directory).
MODEL = (["shvit_s1"], ["shvit_s9", "", "SHViT S1", "../../etc/passwd", "shvit_s1;rm -rf /", "日本語", "-",
                        "x" * 300, "edgevit_s:1024"])
RES = (["64", "64x128"], ["0", "-64", "65", "64x", "x64", "abc", "1e3", "64x64x64", "100000", "0x0", " 64",
                          "64.0", "99999999999999999999999", "64X-64", "٦٤"])
INT = (["1", "2"], ["0", "-1", "-999999", "99999999999999999999", "abc", "1.5", ""])
FLOAT = (["0.5", "1"], ["nan", "inf", "-1", "abc", "1e999", "-inf", ""])
IN_FILE = ([], ["missing.pth", "dir", "empty.bin", "garbage.bin", f"{ODD}.pth", "file/sub", "nan.pth",
                "garbage.onnx", "list.pth"])
ARTIFACT = ([], ["missing.onnx", "dir", "garbage.onnx", "garbage.mlpackage", "garbage.pte", "garbage.tflite",
                 "empty.bin", "garbage.bin", f"{ODD}.onnx", "notes.json"])
IN_DIR = ([], ["missing", "file", "empty_dir", "garbage_dir", f"{ODD}", "file/sub"])
OUT_DIR = ([f"out/{ODD}", "out/plain"], ["file", "file/sub", "/proc/edgevit", "garbage.onnx"])
OUT_FILE = (["out/r.json"], ["dir", "file/sub", "/proc/edgevit/r.json", "missing_dir/"])
RGB = (["0.5,0.5,0.5"], ["1,2", "a,b,c", "0,0,0", "nan,nan,nan", "", "1,2,3,4", "inf,1,1"])

POOLS = {
    ("model", None): MODEL, ("models", None): (["shvit_s1"], MODEL[1] + ["shvit_s1,", ",", "shvit_s1,shvit_s9"]),
    ("artifact", None): ARTIFACT, ("out", "shapes"): OUT_DIR,
    ("--res", None): RES, ("--size", None): (["32"], INT[1] + ["8", "100000"]),
    ("--format", None): (["onnx"], ["bogus", "", "onnx,coreml", "mlmodel", "tensorflow"]),
    ("--family", None): (["SHViT"], ["bogus", "", "shvit;"]),
    ("--target", None): (["iOS16"], ["iOS3", "", "android"]),
    ("--precision", None): (["fp32"], ["fp8", "int4", ""]),
    ("--layout", None): (["nchw"], ["nhcw", "", "NCHW!"]),
    ("--interpolation", None): (["bicubic"], ["cubic", "", "nearest-exact!"]),
    ("--crop-pct", None): (["0.875"], FLOAT[1] + ["0", "2", "1.5"]),
    ("--mean", None): RGB, ("--std", None): RGB,
    ("--passes", None): (["none"], ["bogus", "fold_batchnorm,bogus", ",", "default,"]),
    ("--features", None): (["s16"], ["s3", "feat_s7", "bogus", ","]),
    ("--opset", None): (["18"], ["11", "0", "-1", "abc", "99999"]),
    ("--weights", None): IN_FILE, ("--labels", None): IN_FILE, ("--image", None): IN_FILE,
    ("--out", None): OUT_DIR, ("--output", None): (["out/x.onnx"], ["dir", "file/sub", "/proc/edgevit/x.onnx"]),
    ("--cache-dir", None): OUT_DIR, ("--json", "bench"): OUT_FILE, ("--csv", None): OUT_FILE,
    ("--plot", None): (["out/p.png"], OUT_FILE[1] + ["out/p.bogus"]),
    ("--json", "profile"): OUT_FILE,
    ("--calib", None): (["synthetic"], IN_DIR[1]), ("--eval", None): IN_DIR, ("--data", None): IN_DIR,
    ("--method", None): (["minmax"], ["bogus", "", "kl"]),
    ("--protocol", None): (["iphone12"], ["bogus", "", "iphone13"]),
    ("--runtime", None): (["ort"], ["bogus", "", "ort,bogus", "tensorrt"]),
    ("--compare", None): ([], []),
    ("--sensitivity", None): (["auto"], ["bogus", "", "-1"]),
    ("--keep-float", None): (["node_1"], ["", ",", "no_such_node"]),
    ("--domain", None): (["shapes"], ["bogus", ""]),
    ("--max-drop", None): FLOAT, ("--max-seconds", None): FLOAT,
    ("--weights-bits", None): (["8"], INT[1] + ["3", "16"]), ("--palettize", None): (["4"], INT[1] + ["3", "9"]),
    ("--model", "train-shapes"): MODEL,
}
NO_POISON = {"--seed"}   # any integer is a seed


def _commands():
    import typer

    from edgevit_export.cli import app

    out = {}
    for name, cmd in typer.main.get_command(app).commands.items():
        params = []
        for p in cmd.params:
            key = p.opts[0] if p.param_type_name == "option" else p.name
            if getattr(p, "is_flag", False):
                pool = ([True], [])
            else:
                pool = POOLS.get((key, name)) or POOLS.get((key, None)) or (INT if key in ("--seed",) else INT)
            params.append((key, p.param_type_name == "argument", getattr(p, "is_flag", False), p.required, pool))
        out[name] = params
    return out


COMMANDS = _commands()


@st.composite
def command_lines(draw):
    name = draw(st.sampled_from(sorted(COMMANDS)))
    params = COMMANDS[name]
    poisonable = [i for i, (key, _a, flag, _r, pool) in enumerate(params) if pool[1] and key not in NO_POISON]
    poison = draw(st.sampled_from(poisonable + [-1]))   # -1: an option that does not exist
    args: list[str] = [name]
    tail: list[str] = []
    for i, (key, is_arg, flag, required, (ok, bad)) in enumerate(params):
        if i == poison:
            value = draw(st.sampled_from(bad))
        elif flag:
            if draw(st.booleans()):
                tail.append(key)
            continue
        else:
            choices = ok + bad
            present = is_arg or required or draw(st.integers(0, 3)) == 0
            if not present or not choices:
                if is_arg and not choices:   # a required positional with nothing cheap: hostile
                    value = draw(st.sampled_from(bad))
                else:
                    continue
            else:
                value = draw(st.sampled_from(choices))
        if is_arg:
            args.append(value)
        else:
            tail += [key, value]
    if poison == -1:
        tail.append(draw(st.sampled_from(["--bogus", "--res=", "-Z", "--format-onnx", "--help-me"])))   # ("--" only ends the options: not hostile)
    event(f"command: {name}")
    return args + tail


def _sandbox(root: Path) -> None:
    """The files the hostile pools name, relative to the working directory."""
    import torch

    (root / "dir").mkdir()
    (root / "empty_dir").mkdir()
    (root / "garbage_dir").mkdir()
    (root / "garbage_dir" / "a.jpg").write_bytes(os.urandom(512))
    (root / "garbage_dir" / "b.png").write_bytes(b"")
    (root / "file").write_text("a file, not a folder\n")
    (root / "empty.bin").write_bytes(b"")
    for n in ("garbage.bin", "garbage.onnx", "garbage.pte", "garbage.tflite"):
        (root / n).write_bytes(os.urandom(2048))
    (root / "garbage.mlpackage").mkdir()
    (root / "garbage.mlpackage" / "Manifest.json").write_text("{not json")
    (root / "notes.json").write_text('{"model": "shvit_s1"}')
    torch.save({"model": {"w": torch.tensor([float("nan")])}}, root / "nan.pth")
    torch.save([1, 2, 3], root / "list.pth")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _check(cli, args: list[str], root: Path, seen) -> None:
    before = _tree(root)
    r = cli(*args)
    seen[(args[0], r.exit_code)] += 1
    assert r.exit_code in (0, 1, 2), (args, r.exit_code, r.output[-2000:])
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    assert "Traceback" not in r.output, (args, r.output[-2000:])
    event(f"exit {r.exit_code}")
    if r.exit_code == 2:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr)
        assert _tree(root) == before, (args, sorted(_tree(root) ^ before))


def _fuzz(max_examples: int, derandomize: bool, tmp_path_factory, monkeypatch):
    from typer.testing import CliRunner

    from edgevit_export.cli import app, argv

    root = tmp_path_factory.mktemp("fuzz")
    _sandbox(root)
    monkeypatch.chdir(root)
    runner = CliRunner()
    from collections import Counter

    seen: Counter = Counter()

    def cli(*a):
        return runner.invoke(app, argv(list(a)))

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck))
    @given(command_lines())
    def prop(args):
        _check(cli, args, root, seen)

    prop()
    # the strategy reached every command, and most examples were refused as the bad input they are
    assert {c for c, _ in seen} == set(COMMANDS), set(COMMANDS) - {c for c, _ in seen}
    refused = sum(n for (_, code), n in seen.items() if code == 2)
    assert refused >= 0.8 * sum(seen.values()), seen
    print(sorted(seen.items()))


def test_fuzz_every_command_small(tmp_path_factory, monkeypatch):
    _fuzz(int(os.environ.get("FUZZ_N", 200)), True, tmp_path_factory, monkeypatch)


@pytest.mark.slow
def test_fuzz_every_command_10000(tmp_path_factory, monkeypatch):
    _fuzz(10_000, False, tmp_path_factory, monkeypatch)
