"""Backbone latency at 1024×1024: the SHViT paper's mobile comparison (its detection backbones at
1024, iPhone 12), here on this machine's phone CPU runtimes.

Times `bench --features` (every output, no pooling or classifier) of SHViT-S4, LITv2-S, EdgeViT-S,
FastViT-SA12 and EfficientFormer-L1 under the iphone12 protocol (batch 1, fp32, 2 threads, warm-up,
median with p10–p90), each model in onnxruntime, ExecuTorch (XNNPACK) and LiteRT (XNNPACK), back
to back per model so a slow spell of the VM hits its runtimes alike. Results are merged into
benchmarks/results/features_latency-1024.json after every model (an export or runtime that fails
is recorded with its error and the next one goes on); ``--report`` prints the README's table.

    .venv/bin/python benchmarks/features_latency.py                 # ~25 min on 2 cores
    .venv/bin/python benchmarks/features_latency.py --runs 10 --models shvit_s4
    .venv/bin/python benchmarks/features_latency.py --report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgevit_export.bench import run_bench  # noqa: E402
from edgevit_export.errors import EdgeExportError  # noqa: E402

MODELS = ["shvit_s4", "litv2_s", "edgevit_s", "fastvit_sa12", "efficientformer_l1"]
RUNTIMES = ["ort", "executorch", "litert"]
RESULTS = ROOT / "benchmarks" / "results" / "features_latency-1024.json"


def report(data: dict) -> str:
    titles = {"ort": "onnxruntime", "executorch": "ExecuTorch", "litert": "LiteRT"}
    lines = ["| backbone @1024² | outputs | GMACs | " + " | ".join(f"{titles[r]} ms (p10–p90)" for r in RUNTIMES)
             + " |", "|---|---|---:|" + "---:|" * len(RUNTIMES)]
    for name in MODELS:
        row = data.get("models", {}).get(name)
        if not row:
            continue
        cells = []
        for rt in RUNTIMES:
            t = row["runtimes"].get(rt)
            cells.append("—" if t is None else (f"failed: {t['error'][:60]}" if "error" in t else
                                               f"{t['median_ms']:.0f} ({t['p10_ms']:.0f}–{t['p90_ms']:.0f})"))
        macs = row.get("macs")
        lines.append(f"| {name} | {row['outputs']} | {macs / 1e9:.1f} | " if macs else f"| {name} | {row['outputs']} | — | ")
        lines[-1] += " | ".join(cells) + " |"
    env = data.get("environment", {})
    lines.append("")
    lines.append(f"{env.get('cpu', '?')}, {data.get('threads')} threads, load before {data.get('load')}; "
                 f"protocol {data.get('protocol')}, up to {data.get('runs')} timed runs per cell")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.report:
        print(report(data))
        return 0
    import os

    from edgevit_export.features import feature_info
    from edgevit_export.measure import skeleton
    from edgevit_export.registry import get_model_info

    data.update(protocol="iphone12", runs=args.runs, threads=2, load=[round(v, 2) for v in os.getloadavg()])
    data.setdefault("models", {})
    for name in args.models.split(","):
        outs = ", ".join(f"s{f.stride}" for f in feature_info(skeleton(get_model_info(name).builder)))
        row = {"outputs": outs, "runtimes": {}}
        for rt in RUNTIMES:   # one bench per runtime: a runtime that fails does not lose the others
            try:
                r = run_bench(name, "1024", runtime=rt, runs=args.runs, max_seconds=args.max_seconds,
                              features="all")
            except (EdgeExportError, RuntimeError, MemoryError) as e:
                row["runtimes"][rt] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                continue
            t = r.timings[0]
            row["macs"] = t.macs
            row["runtimes"][rt] = {k: round(v, 3) if isinstance(v, float) else v for k, v in
                                   t.as_dict(samples=False).items() if k in ("median_ms", "p10_ms", "p90_ms", "runs",
                                                                              "stopped_early", "notes")}
            data["environment"] = r.env.as_dict()
            print(f"{name} {rt}: {t.median_ms:.1f} ms ({t.p10_ms:.1f}–{t.p90_ms:.1f}, {t.runs} runs)", flush=True)
        data["models"][name] = row
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
