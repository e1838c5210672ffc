"""LiteRT (.tflite, XNNPACK) against our ONNX in onnxruntime, every zoo model, one run.

    python benchmarks/tflite_vs_ort.py --no-timing          # the zoo at 224: parity + delegation
    python benchmarks/tflite_vs_ort.py --models shvit_s4,litv2_s          # + latency vs ORT
    python benchmarks/tflite_vs_ort.py --models shvit_s4,litv2_s --res 1024 --no-timing
    python benchmarks/tflite_vs_ort.py --report             # the README table from tflite_vs_ort.json

Per model: the plain conversion's delegation (``--passes none``: what users get from
``litert_torch.convert`` on the captured program) and the default ``tflite`` pipeline's, read from
the exported ``.tflite`` in LiteRT's interpreter (parity checked: the saved model in LiteRT against
PyTorch). Timing (iphone12-like: batch 1, fp32, 2 threads, warm-up, then rounds alternating the two
runtimes so a slow spell of the VM hits both): the interpreter's ``invoke`` and an onnxruntime
session (all optimisations, sequential, no spinning) on the same seeded input; medians with
p10–p90. Results are merged into benchmarks/results/tflite_vs_ort.json after every model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pte_vs_ort import CPU, _save, _stats  # noqa: E402

from edgevit_export import api  # noqa: E402
from edgevit_export.exporters import tflite  # noqa: E402
from edgevit_export.ort import session  # noqa: E402
from edgevit_export.registry import list_models  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "tflite_vs_ort.json"
WARMUP, ROUNDS, PER_ROUND = 10, 10, 10


def time_pair(calls: dict, warmup: int = WARMUP, rounds: int = ROUNDS, per_round: int = PER_ROUND) -> dict:
    """Medians (p10–p90) of zero-argument ``calls`` timed in alternating rounds (each round in a
    rotated order), after ``warmup`` calls each."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {k: [] for k in calls}
    keys = list(calls)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            for _ in range(per_round):
                t = time.perf_counter()
                calls[key]()
                times[key].append((time.perf_counter() - t) * 1e3)
    return {k: _stats(v) for k, v in times.items()}


def _time_both(tflite_path: Path, onnx_path: Path, threads: int = 2) -> dict:
    runner = tflite.TfliteRunner(tflite_path, threads)
    spec = runner.inputs[0]
    x = np.random.default_rng(0).standard_normal(spec["shape"]).astype(np.float32)
    sess = session(onnx_path, threads=threads, optimize=True, spinning=False)
    name = sess.get_inputs()[0].name
    out = time_pair({"litert": runner.prepared({spec["name"]: x}), "ort": lambda: sess.run(None, {name: x})})
    out["ratio"] = out["litert"]["median_ms"] / out["ort"]["median_ms"]
    return out


def _summary(facts: dict) -> dict:
    d = facts["delegation"]
    return {"partitions": d["delegate_partitions"], "ops_outside": d["ops_outside"], "outside_by_op": d["outside_by_op"],
            "transposes": facts["transposes"], "ops": facts["nodes"]}


def measure(name: str, res: int, tmp: Path, timing: bool) -> dict:
    row: dict = {"model": name, "res": res}
    t = time.perf_counter()
    r = api.export(name, format="tflite", res=res, out=tmp, force=True)
    row["export_s"] = round(time.perf_counter() - t, 1)
    row["parity"] = {k: r.checks["parity"].get(k) for k in ("max_rel", "passed", "cosine")}
    row["structure"] = r.checks["structure"]["summary"]
    row["passed"] = r.passed
    row["after"] = _summary(tflite.describe(r.artifact))
    info, hw, model, _ = api.prepare_model(name, res, None, None)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    row["before"] = _summary(tflite.report(api.capture(model, x), x)["detail"])
    if timing:
        o = api.export(name, format="onnx", res=res, out=tmp, force=True, check=False)
        row["timing"] = _time_both(r.artifact, o.artifact)
    for f in tmp.iterdir():
        f.unlink()
    return row


def report(results: dict) -> str:
    lines = ["| model | res | partitions before → after | ops outside XNNPACK before → after | outside (after) | "
             "TRANSPOSE before → after | parity max rel | .tflite median ms (p10–p90) | ONNX/ORT median ms | "
             ".tflite / ORT |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    span = lambda s: f"{s['median_ms']:.2f} ({s['p10_ms']:.2f}–{s['p90_ms']:.2f})"  # noqa: E731
    for key in sorted(results, key=lambda k: (results[k]["res"], k)):
        r = results[key]
        if "error" in r:
            lines.append(f"| {r['model']} | {r['res']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        b, a, tm = r["before"], r["after"], r.get("timing")
        left = ", ".join(f"{k} {v}" for k, v in a["outside_by_op"].items()) or "—"
        lines.append(
            f"| {r['model']} | {r['res']} | {b['partitions']} → {a['partitions']} | {b['ops_outside']} → "
            f"{a['ops_outside']} | {left} | {b['transposes']} → {a['transposes']} | {r['parity']['max_rel']:.1e}"
            f"{'' if r['passed'] else ' FAIL'} | {span(tm['litert']) if tm else '—'} | "
            f"{span(tm['ort']) if tm else '—'} | {format(tm['ratio'], '.2f') if tm else '—'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="all")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--no-timing", action="store_true", help="parity and delegation only")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--skip-done", action="store_true")
    a = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if a.report:
        print(report(results))
        return
    names = list_models() if a.models == "all" else a.models.split(",")
    for name in names:
        key = f"{name}@{a.res}"
        if a.skip_done and key in results:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = measure(name, a.res, Path(tmp), not a.no_timing)
            except Exception as e:   # record and go on
                row = {"model": name, "res": a.res, "error": f"{type(e).__name__}: {str(e)[:300]}", "passed": False}
        row["cpu"] = CPU
        results[key] = row
        _save(results, RESULTS)
        tm = row.get("timing")
        print(key, "passed" if row.get("passed") else f"FAILED {row.get('error', row.get('structure'))}",
              f"outside {row['before']['ops_outside']} -> {row['after']['ops_outside']}" if "after" in row else "",
              f"ratio {tm['ratio']:.2f}" if tm else "", flush=True)


if __name__ == "__main__":
    main()
