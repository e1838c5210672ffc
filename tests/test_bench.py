"""bench / profile: the runner times what a plain onnxruntime loop times, protocols do what they
say, bad input exits 2 in one line, and JSON / CSV / PNG reports get written.

No timed assertions with absolute targets: latency figures live in benchmarks/.
"""

from __future__ import annotations

import csv
import json
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from edgevit_export.bench import report
from edgevit_export.bench.env import collect
from edgevit_export.bench.profile import classify, profile_onnx
from edgevit_export.bench.protocols import PROTOCOLS, get_protocol
from edgevit_export.bench.cache import cache_path, cached_export
from edgevit_export.bench.matmul_peak import measure_matmul_peak
from edgevit_export.bench.onnx_facts import onnx_input
from edgevit_export.bench.results import BenchResult, Timing
from edgevit_export.bench.timing import time_callable, time_onnx
from edgevit_export.errors import EdgeExportError
from edgevit_export.ort import session


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="session")
def s1_64(cache):
    """shvit_s1 at 64 px, batch 1, exported once through the bench cache (what bench times)."""
    path, manifest, reused = cached_export("shvit_s1", (64, 64), batch=1, passes="default", cache_dir=cache)
    assert not reused
    return path


def _plain_median(path, threads: int, runs: int) -> float:
    """A plain onnxruntime timing loop: session, warm-up, perf_counter around run()."""
    sess = session(path, threads=threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    for _ in range(10):
        sess.run(None, {name: x})
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def test_runner_median_agrees_with_plain_onnxruntime_loop(s1_64):
    """Same file, same settings, same process: interleaved repeats, best median of each side."""
    proto = get_protocol("iphone12")
    ratios = []
    for _attempt in range(3):  # a shared 2-core machine: retry a noisy attempt, never loosen the bound
        ours, plain = [], []
        for _ in range(5):
            ours.append(time_onnx(s1_64, proto, threads=1, runs=60).median_ms)
            plain.append(_plain_median(s1_64, threads=1, runs=60))
        ratio = min(ours) / min(plain)
        ratios.append(ratio)
        if abs(ratio - 1) < 0.10:
            break
    assert abs(ratios[-1] - 1) < 0.10, f"runner / plain loop median ratios per attempt: {ratios}"


def test_modelbench_rounds_fresh_sessions_discard_and_trim():
    sessions, calls = [], []

    def make_run():
        sessions.append(len(calls))
        return lambda: calls.append(1)

    m = time_callable(make_run, PROTOCOLS["modelbench"])
    assert len(sessions) == 20 and m.rounds == 20               # a fresh session each round
    assert len(calls) == 20 * 51                                 # 1 discarded + 50 timed per round
    assert m.runs == 20 * 30 and m.warmup_runs == 20             # 10 fastest + 10 slowest trimmed
    assert len(m.round_means_ms) == 20
    assert m.headline_ms == pytest.approx(np.mean(m.round_means_ms))
    m = time_callable(make_run, PROTOCOLS["modelbench"], runs=5)
    assert m.runs == 20 * 3                                      # 20% trimmed at each end


def test_iphone12_defaults_and_budget():
    p = PROTOCOLS["iphone12"]
    assert (p.batch, p.threads, p.runs, p.statistic) == (1, 2, 1000, "median")
    assert (PROTOCOLS["shvit-cpu"].batch, PROTOCOLS["shvit-cpu"].threads) == (16, 1)
    calls = []
    m = time_callable(lambda: (lambda: (calls.append(1), time.sleep(0.002))), p, runs=1000, max_seconds=0.05)
    assert m.stopped_early and 10 <= m.runs < 1000 and len(m.samples_ms) == m.runs
    with pytest.raises(EdgeExportError, match="--runs"):
        time_callable(lambda: (lambda: None), p, runs=0)


def test_bench_cli_writes_json_csv_plot_and_reuses_cache(cli, s1_64, cache, tmp_path):
    out = tmp_path / "reports"
    args = ("bench", "shvit_s1", "--res", "64", "--runs", "20", "--cache-dir", cache,
            "--json", out / "r.json", "--csv", out / "r.csv", "--plot", out / "r.png")
    mtime = s1_64.stat().st_mtime_ns
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert "median ms" in res.output and "shvit_s1" in res.output and "p90 − p10" in res.output
    assert s1_64.stat().st_mtime_ns == mtime  # the cached export was re-used, not rebuilt

    data = json.loads((out / "r.json").read_text())
    assert data["protocol"]["name"] == "iphone12" and data["threads"] == 2
    env = data["environment"]
    assert env["cpu"] and env["onnxruntime"] and env["torch"] and env["intra_op_threads"] == 2
    [r] = data["results"]
    assert r["res"] == [64, 64] and r["batch"] == 1 and r["runs"] == 20 and len(r["samples_ms"]) == 20
    assert r["cached"] is True and r["path"] == str(s1_64)
    assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["spread_ms"] == pytest.approx(r["p90_ms"] - r["p10_ms"])
    assert r["gflops"] == pytest.approx(2 * r["macs"] / (r["median_ms"] / 1e3) / 1e9)

    rows = list(csv.DictReader((out / "r.csv").open()))
    assert len(rows) == 1 and rows[0]["model"] == "shvit_s1" and rows[0]["res"] == "64"
    assert float(rows[0]["median_ms"]) == pytest.approx(r["median_ms"], rel=1e-4)

    png = (out / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "r.png") as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_bench_an_onnx_file_and_torch_runtime(cli, s1_64, tmp_path):
    res = cli("bench", s1_64, "--runs", "5", "--threads", "1", "--json", tmp_path / "f.json")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "f.json").read_text())["results"][0]
    assert r["source"] == "file" and r["res"] == [64, 64] and r["macs"] > 0
    res = cli("bench", "shvit_s1", "--res", "64", "--runtime", "torch", "--runs", "5", "--json", tmp_path / "t.json")
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["runtime"] == "torch" and d["results"][0]["source"] == "pytorch" and d["results"][0]["macs"] > 0


def _plot_result(resolutions=(224, 512, 1024), protocol="iphone12") -> BenchResult:
    timings = []
    for name, base in (("shvit_s4", 2.0), ("litv2_s", 6.0)):
        for r in resolutions:
            ms = base * (r / 224) ** 2
            timings.append(Timing(model=name, res=(r, r), batch=1, runtime="ort", threads=2, source="export",
                                  path=None, headline_ms=ms, median_ms=ms, mean_ms=ms, p10_ms=0.9 * ms,
                                  p90_ms=1.2 * ms, q1_ms=ms, q3_ms=ms, min_ms=ms, max_ms=ms, runs=10,
                                  runs_total=20, rounds=1, warmup_runs=10, seconds=1.0, macs=int(1e9 * (r / 224) ** 2),
                                  macs_source="manifest"))
    return BenchResult(protocol=PROTOCOLS[protocol], runtime="ort", threads=2, runs=10, passes="default",
                       env=collect(2), timings=timings, cache_dir=None, seconds=1.0)


def test_plot_and_markdown_from_a_result(tmp_path):
    result = _plot_result()
    p = report.write_plot(result, tmp_path / "sub" / "plot.png")
    with Image.open(p) as im:
        im.verify()
    md = report.markdown_table(result)
    assert md.count("\n") == 2 + 6 and "| shvit_s4 | 1024 |" in md
    assert report.to_csv(result).count("\n") == 7


def _figures(monkeypatch) -> list:
    """The figures the plots render (after titling), kept for the test to read."""
    figs, real = [], report._png
    monkeypatch.setattr(report, "_png", lambda fig, plt, r: (real(fig, plt, r), figs.append(fig))[0])
    return figs


def test_one_resolution_plots_a_ranking(tmp_path, monkeypatch):
    """`bench all --res 224` plots models ranked (a one-point 'vs resolution' plot says nothing), on
    a linear axis: a bar's length is its value."""
    seen = []
    ranking = report._plot_ranking
    monkeypatch.setattr(report, "_plot_ranking", lambda r, plt: seen.append(r) or ranking(r, plt))
    figs = _figures(monkeypatch)
    p = report.write_plot(_plot_result(resolutions=(224,), protocol="shvit-cpu"), tmp_path / "rank.png")
    assert len(seen) == 1
    with Image.open(p) as im:
        im.verify()
    bars = figs[0].axes[0]
    assert bars.get_xscale() == "linear" and bars.get_xlim()[0] == 0
    names = [t.get_text() for t in bars.get_yticklabels()]
    assert sorted(names) == sorted(t.model for t in seen[0].timings)


def test_plot_title_names_the_machine_and_a_busy_machine_is_said(tmp_path, monkeypatch):
    figs = _figures(monkeypatch)
    result = _plot_result()
    result.env.load_average = [0.1, 0.1, 0.1]
    report.plot_png(result)
    result.env.load_average = [float(result.env.cpus_available + 3), 1.0, 1.0]
    report.plot_png(result)
    quiet, busy = figs
    title = quiet._suptitle.get_text()
    assert result.env.cpu in title and "protocol iphone12" in title and "onnxruntime" in title
    assert quiet._supxlabel is None
    assert "the machine was busy" in busy._supxlabel.get_text()


def test_plot_labels_do_not_collide():
    """Crowded points (models of nearly the same MACs and latency) get labels that stand apart."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(layout="constrained")
    ax.scatter([1.0] * 8, [1.0 + 0.001 * i for i in range(8)])
    ax.set_ylim(0, 2)                 # 8 points within a pixel or two of each other
    texts = [report._note(ax, f"model_{i}", (1.0, 1.0 + 0.001 * i), "k") for i in range(8)]
    report._labels_apart(fig, texts, leaders=True)
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


@pytest.mark.parametrize("args, message", [
    (("shvit_s1", "--protocol", "iphone13"), "unknown protocol 'iphone13'"),
    (("shvit_s1", "--runs", "0"), "--runs must be at least 1"),
    (("shvit_s1", "--res", "100"), "cannot take 100x100"),
    (("shvit_s9",), "unknown model 'shvit_s9'"),
    (("shvit_s1", "--runtime", "tflite"), "unknown runtime"),
    (("shvit_s1", "--runtime", "coreml"), "not to time them"),
    (("shvit_s1", "--runtime", "ort,tflite"), "unknown runtime 'tflite'"),
    (("shvit_s1", "--plot", "latency.jpg"), "must end in .png"),
])
def test_bad_input_one_line_exit_2(cli, tmp_path, args, message):
    res = cli("bench", *args, "--cache-dir", tmp_path / "c")
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert not (tmp_path / "c").exists()  # rejected before any export


def test_bench_ort_executorch_and_litert_side_by_side(cli, s1_64, cache, tmp_path, pte_s1_64, tflite_s1_64):
    # the session's .pte and .tflite exports, placed where the bench cache looks (bench re-uses them by sha256)
    from edgevit_export.exporters import get

    for fmt, r in (("pte", pte_s1_64), ("tflite", tflite_s1_64)):
        cached = cache_path(cache, "shvit_s1", (64, 64), 1, "default", fmt)
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(r.artifact, cached)
        shutil.copy(r.manifest_path, get(fmt).manifest_path(cached))
    res = cli("bench", "shvit_s1", "--res", "64", "--runtime", "ort,executorch,litert", "--runs", "20",
              "--cache-dir", cache, "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png")
    assert res.exit_code == 0, res.output
    assert "onnxruntime vs ExecuTorch (XNNPACK) vs LiteRT (XNNPACK)" in res.output and "× ort" in res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["runtime"] == "ort,executorch,litert"
    ort, et, lt = data["results"]
    assert (ort["runtime"], et["runtime"], lt["runtime"]) == ("ort", "executorch", "litert")
    assert ort["path"] == str(s1_64) and et["path"].endswith(".pte") and lt["path"].endswith(".tflite")
    for t in (et, lt):
        assert t["runs"] == 20 and t["p10_ms"] <= t["median_ms"] <= t["p90_ms"] and t["cached"]
    assert any("1 XNNPACK delegate call" in n for n in et["notes"])
    assert any("1 XNNPACK partition, 0 ops outside" in n for n in lt["notes"])
    assert (tmp_path / "r.png").stat().st_size > 0
    assert cli("bench", s1_64, "--runtime", "executorch").exit_code == 2   # .pte by name only
    assert cli("bench", s1_64, "--runtime", "litert").exit_code == 2       # .tflite by name only

    # the same cached .pte, profiled through ExecuTorch's ETDump: XNNPACK's own operators
    res = cli("profile", "shvit_s1", "--res", "64", "--runtime", "executorch", "--runs", "5", "--cache-dir", cache,
              "--json", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    [prof] = json.loads((tmp_path / "p.json").read_text())["profiles"]
    assert prof["runtime"] == "executorch" and prof["path"] == et["path"]
    kinds = {o["op_type"] for o in prof["ops"]}
    assert any(k.startswith("Convolution (NHWC, F32)") for k in kinds), kinds
    assert prof["compute_share"] > 0.3 and prof["other_ms"] == 0


def test_not_an_onnx_model_exit_2(cli, tmp_path, s1_64):
    junk = tmp_path / "model.onnx"
    junk.write_text("definitely not protobuf")
    for path, message in ((junk, "is not an ONNX model"), (tmp_path / "missing.onnx", "no such file")):
        res = cli("bench", path)
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1
        assert "Traceback" not in res.output
    res = cli("bench", s1_64, "--protocol", "shvit-cpu")  # a batch-1 file cannot run batch 16
    assert res.exit_code == 2 and "--batch 16" in res.output
    res = cli("profile", s1_64, "--compare")
    assert res.exit_code == 2 and "model name" in res.output


def test_profile_splits_memory_and_compute(cli, s1_64, tmp_path):
    p = profile_onnx(s1_64, threads=1, runs=5, warmup=2)
    assert p.runs == 5 and p.node_count > 50
    assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    assert p.compute_share + p.memory_share + p.share(p.other_ms) == pytest.approx(1.0)
    assert 0 < p.compute_share < 1 and 0 < p.memory_share < 1
    assert {o.op_type for o in p.ops} >= {"Conv", "Softmax"}
    assert any(n.depthwise for n in p.nodes)  # SHViT's 3×3 depthwise convs
    assert classify("Transpose")[0] == "memory-bound" and classify("MatMul")[0] == "compute-bound"
    # onnxruntime's node names (relu_1_nchwc, conv2d_3_nchwc …) map back to the model's conv modules
    from edgevit_export.registry import create_model

    modules = dict(create_model("shvit_s1").named_modules())
    convs = [n for n in p.nodes if n.op_type in ("Conv", "FusedConv")]
    assert convs and all(isinstance(modules.get(n.module), torch.nn.Conv2d) for n in convs), \
        [(n.name, n.module) for n in convs if not isinstance(modules.get(n.module), torch.nn.Conv2d)]
    assert any(n.fused == "Relu" for n in convs)   # SHViT's Conv2d_BN + ReLU, fused by onnxruntime
    assert len({n.module for n in convs}) == len(convs)
    res = cli("profile", s1_64, "--runs", "3", "--threads", "1", "--json", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    assert "memory-bound" in res.output and "compute-bound" in res.output and "Conv" in res.output
    assert "+Relu fused" in res.output
    d = json.loads((tmp_path / "p.json").read_text())["profiles"][0]
    assert d["compute_share"] + d["memory_share"] <= 1.0 + 1e-9
    slowest = next(n for n in d["nodes"] if n["op_type"] in ("Conv", "FusedConv"))
    assert slowest["module"] and slowest["module"] in res.output


def test_matmul_peak_is_measured():
    peak = measure_matmul_peak(threads=1, sizes=(64, 128), seconds_per_size=0.1, min_runs=3)
    assert peak.peak_gflops > 0 and peak.best_size in (64, 128)


def test_onnx_input_reads_the_image_input(s1_64):
    inp = onnx_input(s1_64)
    assert inp.name == "images" and inp.shape == [1, 3, 64, 64] and inp.dtype == "float32"


@pytest.mark.slow
def test_shvit_cpu_exports_batch_16(cli, cache, tmp_path):
    res = cli("bench", "shvit_s1", "--res", "64", "--protocol", "shvit-cpu", "--runs", "3", "--cache-dir", cache,
              "--json", tmp_path / "c.json")
    assert res.exit_code == 0, res.output
    assert "img/s" in res.output
    r = json.loads((tmp_path / "c.json").read_text())["results"][0]
    assert r["batch"] == 16 and r["threads"] == 1 and "-b16-" in r["path"]
    assert r["images_per_s"] == pytest.approx(16 / (r["median_ms"] / 1e3))
