import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ["COLUMNS"] = "200"  # rich renders tables at full width under CliRunner
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(2)


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture
def cli(runner):
    """Run the CLI in-process: cli("export", "shvit_s1", ...) → Result (exit_code, output)."""
    from edgevit_export.cli import app, argv

    def run(*args):
        return runner.invoke(app, argv([str(a) for a in args]))

    return run


@pytest.fixture
def cli80(runner, monkeypatch):
    """The CLI as an 80-column terminal renders it (tables, wrapped text, typer's --help)."""
    from edgevit_export import cli as cli_mod
    from edgevit_export.cli import app, argv

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(cli_mod.console, "_width", 80)
    monkeypatch.setattr(cli_mod.err_console, "_width", 80)

    def run(*args):
        return runner.invoke(app, argv([str(a) for a in args]))

    return run


# --- a real classifier: SHViT-S1 trained on the drawn shapes (cached across sessions) -------------

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "edgevit_export"
TRAIN = dict(model="shvit_s1", res=64, per_class=200, epochs=10, batch=128, lr=8e-3, seed=0)


def _digest(files: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)   # concurrent sessions wait for one training
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _drop_stale(cache: Path, keep: Path, hours: float = 6.0) -> None:
    """Remove trained sets of older code versions (untouched for a while: not in use elsewhere)."""
    import time

    for old in cache.glob("quantize-*"):
        if old != keep and old.is_dir() and time.time() - old.stat().st_mtime > hours * 3600:
            shutil.rmtree(old, ignore_errors=True)
            old.with_name(old.name + ".lock").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def trained():
    """SHViT-S1 trained on drawn shapes + calibration/held-out folders + its float ONNX (cached)."""
    import inspect

    from edgevit_export import api
    from edgevit_export.calibration import data as cdata
    from edgevit_export.calibration.shapes import write_shapes
    from edgevit_export.calibration.train import TEST_SEED, TRAIN_SEED, draw_size, train_shapes

    cache = ROOT / ".edgevit-cache"

    key = _digest([PKG / "calibration" / f for f in ("shapes.py", "train.py")] + [PKG / "models" / "shvit.py"],
                  json.dumps(TRAIN, sort_keys=True) + torch.__version__ + inspect.getsource(cdata.Preprocess))
    d = cache / f"quantize-{key}"
    ckpt = d / "shvit_s1-shapes-64.pth"
    with _locked(cache / f"quantize-{key}.lock"):
        if not (d / "done").exists():
            _drop_stale(cache, keep=d)
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            r = train_shapes(ckpt, **TRAIN)
            write_shapes(d / "calib", 20, size=draw_size(64), seed=TRAIN_SEED)   # 200 training-like images
            write_shapes(d / "test", 100, size=draw_size(64), seed=TEST_SEED)   # 1,000 held-out images
            (d / "train.json").write_text(json.dumps({"val_top1": r.val_top1, "seconds": r.seconds,
                                                      "history": r.history}))
            (d / "done").touch()
        # the float ONNX depends on the exporter too: its own key, re-exported when that code changes
        ekey = _digest(sorted((PKG / "exporters").glob("*.py")) + sorted((PKG / "passes").glob("*.py")) +
                       [PKG / "api.py"], "")
        onnx_path = d / f"float-{ekey}" / "shvit_s1-64.onnx"
        if not onnx_path.exists():
            api.export("shvit_s1", format="onnx", res=64, weights=str(ckpt), out=onnx_path.parent, force=True)
    return SimpleNamespace(dir=d, ckpt=ckpt, calib=d / "calib", test=d / "test", onnx=onnx_path,
                           train=json.loads((d / "train.json").read_text()))


def _once_per_run(tmp_path_factory, name: str, make):
    """What ``make(folder)`` returns, built by one pytest-xdist worker and read back by the others
    (a conversion costs 30-90 s; each worker would otherwise repeat it). The result is pickled,
    so it must not hold a live program: export results keep their files, not ``pipeline``."""
    import os
    import pickle

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "once-per-run"
    done = root / f"{name}.pickle"
    with _locked(root / f"{name}.lock"):
        if not done.exists():
            done.write_bytes(pickle.dumps(make(root / name)))
    return pickle.loads(done.read_bytes())


def _export_once(tmp_path_factory, fmt: str, **options):
    import dataclasses

    from edgevit_export import api

    key = "-".join([f"shvit_s1-64-{fmt}", *(f"{k}={v}" for k, v in sorted(options.items()))])
    return _once_per_run(tmp_path_factory, key, lambda out: dataclasses.replace(
        api.export("shvit_s1", format=fmt, res=64, out=out, **options), pipeline=None))


@pytest.fixture(scope="session")
def onnx_s1_64(tmp_path_factory):
    """shvit_s1 at 64 px exported to ONNX (checked) once per run; tests read it, never change it."""
    return _export_once(tmp_path_factory, "onnx")


@pytest.fixture(scope="session")
def coreml_s1_64(tmp_path_factory):
    """shvit_s1 at 64 px exported to Core ML (image in, classifier out; checked) once per run."""
    return _export_once(tmp_path_factory, "coreml")


@pytest.fixture(scope="session")
def coreml_fp32_s1_64(tmp_path_factory):
    """shvit_s1 at 64 px, an fp32 Core ML package (checked in the runner, gated) once per run."""
    return _export_once(tmp_path_factory, "coreml", precision="fp32")


@pytest.fixture(scope="session")
def pte_s1_64(tmp_path_factory):
    """shvit_s1 at 64 px exported to .pte once per run (lowering costs 10-30 s a model)."""
    pytest.importorskip("executorch")
    return _export_once(tmp_path_factory, "pte")


@pytest.fixture(scope="session")
def tflite_s1_64(tmp_path_factory):
    """shvit_s1 at 64 px exported to .tflite once per run (litert-torch takes ~15-30 s a model)."""
    pytest.importorskip("litert_torch")
    return _export_once(tmp_path_factory, "tflite")
