"""Every runtime we have, side by side: ONNX in onnxruntime, .pte in ExecuTorch, .tflite in LiteRT,
each fp32 and int8, one run per model, with one plot — the picture for picking a runtime.

    python benchmarks/runtimes.py                                  # SHViT-S4, LITv2-S, MobileNetV3-L at 224
    python benchmarks/runtimes.py --models shvit_s4 --res 224
    python benchmarks/runtimes.py --report                         # README table + the plot from runtimes.json

Per model: the fp32 artifacts from ``export`` (each format's default pipeline, parity checked),
the int8 ones from ``quantize`` (random weights, 16 synthetic calibration images: the speed of the
int8 program, not its accuracy — accuracy is measured on the shapes demo, see the README). Timing
(iphone12-like: batch 1, 2 threads, warm-up, then rounds alternating all six so a slow spell of the
VM hits them alike): each runtime's own call with the input set once; medians with p10–p90.
Results are merged into benchmarks/results/runtimes.json after every model; the plot goes to
benchmarks/results/runtimes.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from pte_vs_ort import CPU, _save  # noqa: E402
from tflite_vs_ort import time_pair  # noqa: E402

from edgevit_export import api  # noqa: E402
from edgevit_export.calibration.quantize import quantize  # noqa: E402
from edgevit_export.exporters import get  # noqa: E402
from edgevit_export.ort import session  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "runtimes.json"
PLOT = RESULTS.with_suffix(".png")
FORMATS = {"onnx": "onnxruntime", "pte": "ExecuTorch", "tflite": "LiteRT"}
WARMUP, ROUNDS, PER_ROUND = 5, 12, 8


def _call(fmt: str, path: Path):
    """The zero-argument call that runs ``path`` once, its input set (a seeded N(0, 1) image)."""
    if fmt == "onnx":
        sess = session(path, threads=2, optimize=True, spinning=False)
        i = sess.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal(i.shape).astype(np.float32)
        return lambda: sess.run(None, {i.name: x})
    runner = get(fmt).backend().load(path, 2)
    spec = runner.inputs[0]
    x = np.random.default_rng(0).standard_normal(spec["shape"]).astype(np.float32)
    return runner.prepared({spec["name"]: x})


def measure(name: str, res: int, tmp: Path) -> dict:
    row: dict = {"model": name, "res": res, "artifacts": {}}
    calls = {}
    for fmt in FORMATS:
        t = time.perf_counter()
        r = api.export(name, format=fmt, res=res, out=tmp / fmt, force=True)
        row["artifacts"][f"{fmt} fp32"] = {"passed": r.passed, "bytes": r.artifact.stat().st_size,
                                           "structure": r.checks["structure"]["summary"],
                                           "seconds": round(time.perf_counter() - t, 1)}
        calls[f"{fmt} fp32"] = _call(fmt, r.artifact)
        t = time.perf_counter()
        q = quantize(name, res=res, calib="synthetic", calib_size=16, eval_size=4, sensitivity_samples=0,
                     format=fmt, out=tmp / f"{fmt}-int8", force=True)
        structure = (q.manifest.get("checks") or {}).get("structure", {}).get("summary", "")
        row["artifacts"][f"{fmt} int8"] = {"bytes": q.sizes["int8_bytes"], "structure": structure,
                                           "scheme": q.scheme, "seconds": round(time.perf_counter() - t, 1)}
        calls[f"{fmt} int8"] = _call(fmt, q.artifact)
    row["timing"] = time_pair(calls, WARMUP, ROUNDS, PER_ROUND)
    return row


def report(results: dict) -> str:
    keys = [f"{f} {p}" for p in ("fp32", "int8") for f in FORMATS]
    head = " | ".join(f"{FORMATS[k.split()[0]]} {k.split()[1]}" for k in keys)
    lines = [f"| model | res | {head} | int8 / fp32 (ORT, ExecuTorch, LiteRT) |",
             "|---|---:|" + "---:|" * (len(keys) + 1)]
    for key in sorted(results, key=lambda k: (results[k]["res"], k)):
        r = results[key]
        tm = r["timing"]
        cells = [f"{tm[k]['median_ms']:.2f} ({tm[k]['p10_ms']:.2f}–{tm[k]['p90_ms']:.2f})" for k in keys]
        ratios = ", ".join(f"{tm[f'{f} int8']['median_ms'] / tm[f'{f} fp32']['median_ms']:.2f}" for f in FORMATS)
        lines.append(f"| {r['model']} | {r['res']} | " + " | ".join(cells) + f" | {ratios} |")
    return "\n".join(lines)


def plot(results: dict, path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results.values(), key=lambda r: (r["res"], r["model"]))
    keys = [f"{f} {p}" for f in FORMATS for p in ("fp32", "int8")]
    fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(rows)), 4.4), layout="constrained")
    width = 0.8 / len(keys)
    colors = {"onnx": "#4c72b0", "pte": "#dd8452", "tflite": "#55a868"}
    for j, k in enumerate(keys):
        fmt, prec = k.split()
        med = [r["timing"][k]["median_ms"] for r in rows]
        lo = [r["timing"][k]["median_ms"] - r["timing"][k]["p10_ms"] for r in rows]
        hi = [r["timing"][k]["p90_ms"] - r["timing"][k]["median_ms"] for r in rows]
        xs = [i + (j - len(keys) / 2 + 0.5) * width for i in range(len(rows))]
        ax.bar(xs, med, width, yerr=[lo, hi], color=colors[fmt], alpha=1.0 if prec == "fp32" else 0.55,
               hatch="" if prec == "fp32" else "//", label=f"{FORMATS[fmt]} {prec}", capsize=2)
        for x, m, h in zip(xs, med, hi):     # the median, above its whisker
            ax.annotate(f"{m:.1f}", (x, m + h), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    ax.set_xticks(range(len(rows)), [f"{r['model']} @ {r['res']}" for r in rows])
    ax.set_ylabel("median latency, ms (whiskers p10–p90)")
    ax.set_ylim(0, max(r["timing"][k]["p90_ms"] for r in rows for k in keys) * 1.12)
    ax.set_title("the same model in each phone CPU runtime, fp32 and int8", fontsize=10)
    fig.suptitle(f"batch 1 · 2 threads · one run · {rows[0].get('cpu', '')}", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="shvit_s4,litv2_s,mobilenetv3_large_100")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not a.report:
        for name in a.models.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                row = measure(name, a.res, Path(tmp))
            row["cpu"] = CPU
            results[f"{name}@{a.res}"] = row
            _save(results, RESULTS)
            tm = row["timing"]
            print(name, {k: round(v["median_ms"], 2) for k, v in tm.items()}, flush=True)
    print(report(results))
    plot(results)


if __name__ == "__main__":
    main()
