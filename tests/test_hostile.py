"""Hostile input through the CLI: broken checkpoints, sizes that cannot fit in memory, bad image
files, Ctrl-C, two exports racing for one path, a full disk. Each ends in one line and the right
exit code, and leaves nothing half-written."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevit_export.errors import OutputError, ResolutionError

CLI = [sys.executable, "-m", "edgevit_export"]


def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


# --- checkpoints ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    from safetensors.torch import save_file

    from edgevit_export.registry import create_model

    d = tmp_path_factory.mktemp("ckpt")
    sd = create_model("shvit_s1").state_dict()
    floats = [k for k, v in sd.items() if v.is_floating_point()]
    nan = dict(sd)
    nan[floats[7]] = sd[floats[7]].clone()
    nan[floats[7]].view(-1)[3] = float("nan")
    torch.save({"model": nan}, d / "nan.pth")
    inf = {k: v.contiguous() for k, v in sd.items()}
    inf[floats[12]] = torch.full_like(sd[floats[12]], float("-inf"))
    save_file(inf, str(d / "inf.safetensors"))
    save_file({k: (v.to(torch.int32) if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
              str(d / "ints.safetensors"))
    torch.save([torch.zeros(3)], d / "list.pth")
    torch.save({"epoch": 3, "note": "no tensors"}, d / "dict.pth")
    (d / "random.pth").write_bytes(os.urandom(4096))
    (d / "empty.pth").write_bytes(b"")
    return d, floats


@pytest.mark.parametrize("name, expect", [
    ("nan.pth", "tensor '{f7}' holds NaN (1 of"),
    ("inf.safetensors", "tensor '{f12}' holds Inf"),
    ("ints.safetensors", "integer or bool where a float is needed"),
    ("list.pth", "holds a list, not a state dict"),
    ("dict.pth", "holds no tensors, not a state dict"),
    ("random.pth", "is not a readable PyTorch checkpoint"),
    ("empty.pth", "the file is empty"),
])
def test_bad_checkpoint_is_exit_2_naming_the_problem_and_writes_nothing(cli, bad_checkpoints, tmp_path, name,
                                                                         expect):
    d, floats = bad_checkpoints
    out = tmp_path / "out"
    r = cli("export", "shvit_s1", "--res", "64", "--weights", d / name, "--out", out)
    assert r.exit_code == 2, r.output
    line = _one_error_line(r)
    assert expect.format(f7=floats[7], f12=floats[12]) in line, line
    assert not out.exists()


# --- memory ---------------------------------------------------------------------------------------

def test_activation_peak_counts_what_is_alive_at_once():
    from edgevit_export.memory import activations

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    peak, total = activations(net, (32, 48), batch=2)
    px = 2 * 32 * 48 * 4
    # the input stays referenced; at the ReLU its input (8 ch) and output (8 ch) are both alive
    assert peak == px * 3 + px * 8 * 2
    assert total == px * (3 + 8 + 8 + 4)


def test_a_size_that_cannot_fit_names_the_largest_that_does():
    from edgevit_export.memory import check_fits, needed_bytes
    from edgevit_export.measure import skeleton
    from edgevit_export.registry import get_model_info

    info = get_model_info("shvit_s1")
    avail = 8e9
    with pytest.raises(ResolutionError) as e:
        check_fits("shvit_s1", info, (6400, 6400), available=avail)
    msg = str(e.value)
    n = int(msg.split("--res ")[1].split()[0])
    assert n % 16 == 0 and 64 <= n < 6400
    skel = skeleton(info.builder)
    assert needed_bytes(skel, (n, n), 1) <= avail < needed_bytes(skel, (n + 16, n + 16), 1)
    check_fits("shvit_s1", info, (n, n), available=avail)            # the suggestion is taken
    with pytest.raises(ResolutionError, match=r"largest batch that fits at this size is --batch \d+"):
        check_fits("shvit_s1", info, (n // 2, n // 2), batch=64, available=avail)


@pytest.mark.parametrize("args", [
    ["export", "shvit_s1", "--res", "100000"],
    pytest.param(["export", "litv2_s", "--res", "768x200000", "--format", "coreml"], marks=pytest.mark.slow),
    ["bench", "shvit_s1,shvit_s4", "--res", "224,65536"],
    ["quantize", "shvit_s1", "--res", "50000", "--calib", "synthetic"],
    pytest.param(["inspect", "shvit_s1", "--res", "99984"], marks=pytest.mark.slow),
])
def test_too_large_for_memory_is_refused_before_any_work(cli, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    t = time.perf_counter()
    r = cli(*args)
    assert r.exit_code == 2, r.output
    line = _one_error_line(r)
    assert "of memory to" in line and "available" in line and "the largest size that fits is --res" in line
    assert time.perf_counter() - t < 60
    assert list(tmp_path.iterdir()) == []


# --- image folders --------------------------------------------------------------------------------

def _png_claiming(path: Path, w: int, h: int) -> None:
    """A small PNG whose header claims w×h pixels: a decompression bomb's shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 999))
                     + chunk(b"IEND", b""))


def _hostile_images(d: Path) -> dict[str, str]:
    """Files no reader can use; returns name → what it is."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.png").write_text("not an image\n")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "JPEG")
    (d / "cut.jpg").write_bytes(buf.getvalue()[:300])
    _png_claiming(d / "bomb.png", 60_000, 60_000)
    _png_claiming(d / "bomb_small.png", 12_000, 12_000)     # above the limit, below Pillow's own error
    return {"zero.jpg": "zero bytes", "text.png": "text", "cut.jpg": "truncated", "bomb.png": "bomb",
            "bomb_small.png": "bomb"}


def test_image_modes_are_read_as_8_bit_rgb_and_hostile_files_skipped(tmp_path):
    from PIL import Image

    from edgevit_export.calibration.data import CorruptImage, load_image

    g16 = np.full((20, 30), 32896, np.uint16)             # mid-grey in 16 bits
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")   # red
    Image.new("RGBA", (30, 20), (10, 200, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("LA", (30, 20), (77, 128)).save(tmp_path / "la.png")
    Image.new("P", (30, 20), 0).save(tmp_path / "p.gif")
    Image.fromarray(np.full((20, 30), 0.25, np.float32), "F").save(tmp_path / "f.tiff")
    expect = {"g16.png": (128, 128, 128), "cmyk.jpg": (255, 0, 0), "rgba.png": (10, 200, 30),
              "la.png": (77, 77, 77), "f.tiff": (64, 64, 64)}
    for name, rgb in expect.items():
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == (30, 20)
        assert np.abs(np.asarray(im).reshape(-1, 3).mean(0) - rgb).max() <= 2, name
    assert load_image(tmp_path / "p.gif").mode == "RGB"
    for name in _hostile_images(tmp_path / "bad"):
        with pytest.raises(CorruptImage):
            load_image(tmp_path / "bad" / name)


def test_calibration_folder_with_nothing_usable_is_exit_2(cli, tmp_path):
    _hostile_images(tmp_path / "calib" / "sub")
    r = cli("quantize", "shvit_s1", "--res", "64", "--calib", tmp_path / "calib", "--out", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "no readable calibration images; 5 corrupt" in _one_error_line(r)
    assert not (tmp_path / "out").exists()


def test_evaluation_skips_hostile_files_and_counts_them(cli, trained, tmp_path):
    data = tmp_path / "eval"
    for cls in sorted(p.name for p in trained.test.iterdir()):
        (data / cls).mkdir(parents=True)
        for f in sorted((trained.test / cls).iterdir())[:2]:
            shutil.copy(f, data / cls / f.name)
    bad = _hostile_images(data / "circle")
    r = cli("evaluate", "shvit_s1", "--res", "64", "--weights", trained.ckpt, "--data", data)
    assert r.exit_code == 0, r.output
    skipped = [ln for ln in r.output.splitlines() if "skipped corrupt image" in ln]
    assert len(skipped) == len(bad), r.output
    assert "20 images" in r.output or "20 of" in r.output or " 20 " in r.output, r.output

    for cls in list(data.iterdir()):            # nothing usable left
        for f in cls.iterdir():
            if f.name not in bad:
                f.unlink()
    r = cli("evaluate", "shvit_s1", "--res", "64", "--weights", trained.ckpt, "--data", data)
    assert r.exit_code == 2 and "no readable images" in _one_error_line(r)


# --- Ctrl-C ---------------------------------------------------------------------------------------

def _interrupt_at(monkeypatch, stage: str) -> list[str]:
    """Ctrl-C (KeyboardInterrupt) when the progress reaches ``stage``; returns the stages seen."""
    from edgevit_export.bars import Bars

    seen: list[str] = []
    original = Bars.__call__

    def call(self, e):
        seen.append(e.task)
        if stage in e.task:
            raise KeyboardInterrupt
        return original(self, e)

    monkeypatch.setattr(Bars, "__call__", call)
    return seen


def _no_files(d: Path) -> list[str]:
    return [str(p.relative_to(d)) for p in d.rglob("*")] if d.exists() else []


@pytest.mark.parametrize("stage", ["build model", pytest.param("capture", marks=pytest.mark.slow),
                                   pytest.param("fold_batchnorm", marks=pytest.mark.slow), "convert to",
                                   "check the saved"])
def test_ctrl_c_during_export_exits_130_and_leaves_nothing(cli, monkeypatch, tmp_path, stage):
    seen = _interrupt_at(monkeypatch, stage)
    out = tmp_path / "out"
    passes = [] if stage in ("capture", "fold_batchnorm") else ["--passes", "none"]   # else they cost, not test
    r = cli("export", "shvit_s1", "--res", "64", "--out", out, *passes)
    assert any(stage in s for s in seen), seen
    assert r.exit_code == 130, r.output
    assert r.stderr.strip().splitlines()[-1] == "interrupted: nothing was written"
    assert _no_files(out) == []


@pytest.mark.parametrize("stage", ["calibrat", "quantiz"])
def test_ctrl_c_during_quantize_exits_130_and_leaves_nothing(cli, monkeypatch, tmp_path, trained, stage):
    seen = _interrupt_at(monkeypatch, stage)
    out = tmp_path / "out"
    r = cli("quantize", trained.onnx, "--calib", trained.calib, "--calib-size", "4", "--eval-size", "4",
            "--out", out)
    assert any(stage in s.lower() for s in seen), seen
    assert r.exit_code == 130, r.output
    assert _no_files(out) == []


def test_ctrl_c_while_files_are_put_in_place_waits_for_the_whole_set(tmp_path):
    from edgevit_export.exporters import artifacts

    staged = tmp_path / "stage"
    staged.mkdir()
    for n in ("a.onnx", "a.golden.npz", "a.json"):
        (staged / n).write_text(n)
    real = artifacts.commit

    def commit(src, dst):
        real(src, dst)
        if dst.name == "a.onnx":
            os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C after the artifact, before its manifest

    try:
        artifacts.commit = commit
        with pytest.raises(KeyboardInterrupt):
            artifacts.commit_all([(staged / n, tmp_path / n) for n in ("a.onnx", "a.golden.npz", "a.json")], False)
    finally:
        artifacts.commit = real
    assert sorted(p.name for p in tmp_path.glob("a.*")) == ["a.golden.npz", "a.json", "a.onnx"]


def test_real_sigint_during_an_export_leaves_no_file(tmp_path):
    """The signal itself, from outside, while the artifact is being converted (its staging folder exists)."""
    out = tmp_path / "out"
    p = subprocess.Popen(CLI + ["export", "shvit_s1", "--res", "64", "--passes", "none", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob(".edgevit-tmp-*")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted: nothing was written"
    assert _no_files(out) == []


# --- two exports at once, and no replacing without --force ---------------------------------------

@pytest.mark.parametrize("force", [
    True,
    pytest.param(False, marks=pytest.mark.slow),   # the fast tier: test_a_file_that_appears_meanwhile… below
])
def test_concurrent_exports_to_one_path_never_tear_it(tmp_path, force):
    """Two processes export to one path at once. With --force both succeed and the manifest left
    matches the artifact left; without it one wins and the other is refused."""
    from edgevit_export.exporters.artifacts import sha256

    art = tmp_path / "out" / "m.onnx"
    cmd = CLI + ["export", "shvit_s1", "--res", "64", "--no-check", "--passes", "none", "--output", str(art)]
    cmd += ["--force"] if force else []
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    if force:
        assert [rc for rc, _ in results] == [0, 0], results
    else:
        assert sorted(rc for rc, _ in results) == [0, 2], results
        assert "already exists; pass --force" in next(err for rc, err in results if rc == 2)
    manifest = json.loads(art.with_suffix(".json").read_text())
    assert manifest["sha256"] == sha256(art)
    assert sorted(p.name for p in art.parent.iterdir()) == ["m.json", "m.labels.txt", "m.md", "m.onnx"]
    assert manifest["bundle"] == ["m.onnx", "m.labels.txt", "m.md", "m.json"]


def test_a_file_that_appears_meanwhile_is_not_replaced_without_force(tmp_path):
    from edgevit_export.exporters import artifacts

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.onnx").write_text("new")
    (tmp_path / "a.onnx").write_text("someone else's")
    with pytest.raises(OutputError, match="already exists"):
        artifacts.commit_all([(tmp_path / "s" / "a.onnx", tmp_path / "a.onnx")], force=False)
    assert (tmp_path / "a.onnx").read_text() == "someone else's"


# --- a full disk ----------------------------------------------------------------------------------

def _small_files_only(limit: int = 2_000_000):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _full_disk_export(tmp_path, fmt):
    out = tmp_path / "out"
    passes = ["--passes", "none"] if fmt == "onnx" else []      # a Core ML image input needs normalize_input
    r = subprocess.run(CLI + ["export", "shvit_s1", "--res", "64", "--format", fmt, *passes, "--out", str(out)],
                       preexec_fn=_small_files_only(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "no space left writing to" in _one_error_line(r)
    assert _no_files(out) == []


def test_full_disk_export_fails_in_one_line_and_leaves_nothing(tmp_path):
    _full_disk_export(tmp_path, "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["coreml", "pte", "tflite"])
def test_full_disk_every_format(tmp_path, fmt):
    _full_disk_export(tmp_path, fmt)


# --- artifacts the runtimes would crash on -------------------------------------------------------

def test_a_cut_or_foreign_pte_is_refused_before_the_runtime_aborts(cli, tmp_path):
    head = struct.pack("<I", 0x3C) + b"ET12" + b"eh00" + struct.pack("<I", 32) + struct.pack("<QQQ", 10**6, 10**6, 10**5)
    (tmp_path / "cut.pte").write_bytes(head + b"\0" * 1000)
    (tmp_path / "foreign.pte").write_bytes(os.urandom(2048))
    r = cli("run", tmp_path / "cut.pte")
    assert r.exit_code == 2 and "is cut short" in _one_error_line(r)
    r = cli("run", tmp_path / "foreign.pte")
    assert r.exit_code == 2 and "is not an ExecuTorch program" in _one_error_line(r)
