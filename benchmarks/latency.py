"""Latency on this machine under the iphone12 protocol, and how close it gets to the CPU's peak.

Records SHViT-S4 at 224/512/1024 and LITv2-S at 224/1024 (batch 1, fp32, 2 intra-op threads,
sequential, all graph optimisations, warm-up, median of up to 1,000 runs), plus the achieved
GFLOP/s of each against the machine's measured fp32 matrix-multiply peak in onnxruntime (a
one-node MatMul model, same threads). Writes benchmarks/results/latency-iphone12.{json,md,png}.

On a shared machine the CPU time a process gets drifts from minute to minute, so the matmul peak
is probed right before every model × resolution, and each model's GFLOP/s is compared with the
probe taken next to it as well as with the best probe of the whole session.

    .venv/bin/python benchmarks/latency.py                    # ~15 min on 2 cores
    .venv/bin/python benchmarks/latency.py --max-seconds 30   # quicker, fewer runs at 1024

The exports go through the bench cache (~/.cache/edgevit-export/bench or $EDGEVIT_EXPORT_CACHE),
exactly as `edgevit-export bench` makes them; a repeat re-uses them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgevit_export.bench import report  # noqa: E402
from edgevit_export.bench import BenchResult, MatmulPeak, measure_matmul_peak, run_bench  # noqa: E402

CASES = [("shvit_s4", 224), ("shvit_s4", 512), ("shvit_s4", 1024), ("litv2_s", 224), ("litv2_s", 1024)]
PROBE_SIZES = (256, 512, 1024, 2048)


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _peak_dict(p: MatmulPeak) -> dict:
    return {"threads": p.threads, "sizes": p.sizes, "gflops": [round(g, 2) for g in p.gflops],
            "p10_gflops": [round(g, 2) for g in p.p10_gflops], "median_ms": p.median_ms,
            "peak_gflops": p.peak_gflops, "best_size": p.best_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1000, help="timed runs per model × resolution (protocol: 1000)")
    ap.add_argument("--max-seconds", type=float, default=120.0,
                    help="stop timing one model × resolution after this long (at least 10 runs); 0 = no cap")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    cap = args.max_seconds or None

    def progress(ev):
        if not ev.counted or ev.done == ev.total:
            print(f"  {ev.task}" + (f" {ev.done}/{ev.total}" if ev.counted else ""), file=sys.stderr, flush=True)

    def probe() -> MatmulPeak:
        return measure_matmul_peak(threads=args.threads, sizes=PROBE_SIZES, seconds_per_size=1.0)

    t0 = time.perf_counter()
    load_start = _load()
    parts: list[BenchResult] = []
    probes: list[MatmulPeak] = []
    for model, res in CASES:
        # Export (or find in the cache) first, so the probe sits right next to the timing.
        run_bench(model, res, protocol="iphone12", threads=args.threads, runs=1, cache_dir=args.cache_dir,
                  progress=progress)
        print(f"probing the matmul peak before {model}@{res} …", file=sys.stderr, flush=True)
        probes.append(probe())
        parts.append(run_bench(model, res, protocol="iphone12", threads=args.threads, runs=args.runs,
                               max_seconds=cap, cache_dir=args.cache_dir, progress=progress))
    # Repeatability: time the first case again; its median should fall inside the first run's p10–p90.
    again = run_bench(*CASES[0], protocol="iphone12", threads=args.threads, runs=args.runs, max_seconds=cap,
                      cache_dir=args.cache_dir, progress=progress).timings[0]
    probes.append(probe())
    load_end = _load()

    result = parts[0]
    result.env.load_average = load_start
    result.timings = [t for p in parts for t in p.timings]
    result.seconds = time.perf_counter() - t0
    best = max(probes, key=lambda p: p.peak_gflops)
    first = result.timings[0]
    repeat = {"model": CASES[0][0], "res": CASES[0][1], "first_median_ms": first.median_ms,
              "first_p10_ms": first.p10_ms, "first_p90_ms": first.p90_ms, "repeat_median_ms": again.median_ms,
              "within_spread": first.p10_ms <= again.median_ms <= first.p90_ms}

    args.out.mkdir(parents=True, exist_ok=True)
    data = result.as_dict(samples=True)
    data["matmul_peak"] = {"best": _peak_dict(best), "probes": [_peak_dict(p) for p in probes]}
    data["repeat"] = repeat
    data["load_average_start"], data["load_average_end"] = load_start, load_end
    for r, t, p in zip(data["results"], result.timings, probes):
        r["matmul_peak_nearby_gflops"] = p.peak_gflops
        r["share_of_nearby_peak"] = None if t.gflops is None else t.gflops / p.peak_gflops
        r["share_of_best_peak"] = None if t.gflops is None else t.gflops / best.peak_gflops
    report.write_atomic(args.out / "latency-iphone12.json", (json.dumps(data, indent=2) + "\n").encode())
    report.write_plot(result, args.out / "latency-iphone12.png")
    md = markdown(result, probes, best, repeat, load_start, load_end)
    report.write_atomic(args.out / "latency-iphone12.md", md.encode())
    print(md)
    return 0


def _fmt_load(load) -> str:
    return ", ".join(f"{x:g}" for x in load) if load else "n/a"


def markdown(result: BenchResult, probes: list[MatmulPeak], best: MatmulPeak, repeat: dict, load_start,
             load_end) -> str:
    env = result.env
    lines = [
        f"### Latency on this machine, protocol `iphone12` ({env.date[:10]})",
        "",
        f"CPU: {env.cpu} ({env.cpus_available} CPUs available; flags {' '.join(env.cpu_flags) or 'n/a'}) · "
        f"onnxruntime {env.onnxruntime} · torch {env.torch} · {result.threads} intra-op threads, sequential, "
        f"all graph optimisations · load average (1/5/15 min) {_fmt_load(load_start)} at the start, "
        f"{_fmt_load(load_end)} at the end",
        "",
        "| model | res | median ms | p10 ms | spread (p90 − p10) ms | runs | GMACs | GFLOP/s | "
        "matmul peak nearby | % of it | % of best peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t, p in zip(result.timings, probes):
        runs = f"{t.runs:,}" + (" (time cap)" if t.stopped_early else "")
        lines.append(f"| {t.model} | {t.res[0]} | {t.median_ms:,.1f} | {t.p10_ms:,.1f} | {t.spread_ms:,.1f} | {runs} | "
                     f"{t.macs_per_image / 1e9:.2f} | {t.gflops:.1f} | {p.peak_gflops:.0f} | "
                     f"{100 * t.gflops / p.peak_gflops:.0f}% | {100 * t.gflops / best.peak_gflops:.0f}% |")
    sizes = ", ".join(f"{n}: {g:.0f}" for n, g in zip(best.sizes, best.gflops))
    lines += [
        "",
        f"Matrix-multiply peak in onnxruntime ({best.threads} threads, n×n fp32 MatMul, median run), best of "
        f"{len(probes)} probes: **{best.peak_gflops:.0f} GFLOP/s** at n = {best.best_size} (by n: {sizes}); "
        f"the probes ranged {min(p.peak_gflops for p in probes):.0f}–{max(p.peak_gflops for p in probes):.0f} GFLOP/s.",
        f"Repeat of {repeat['model']} at {repeat['res']}: median {repeat['repeat_median_ms']:.2f} ms vs "
        f"{repeat['first_median_ms']:.2f} ms first (p10–p90 {repeat['first_p10_ms']:.2f}–{repeat['first_p90_ms']:.2f}"
        f" ms): {'within' if repeat['within_spread'] else 'OUTSIDE'} the run-to-run spread.",
        "GFLOP/s = 2 × MACs / median. The matmul peak is probed right before each row, because on a shared "
        "machine the CPU time a process gets drifts. Not iPhone figures: onnxruntime's CPU provider on this "
        "CPU in fp32, where the paper used Core ML on the A14. 'time cap' = fewer than 1,000 runs because of "
        "--max-seconds.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
