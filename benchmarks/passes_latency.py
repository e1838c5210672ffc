"""Issue 3's figure: SHViT-S4 at 1024, ONNX with --passes default vs none.

Counts reshape/transpose nodes in both ONNX files and times both in onnxruntime (fp32, 2 threads,
sequential, all graph optimisations), interleaved in one process, median of N runs each.
Writes benchmarks/results/passes_latency.json and prints a markdown table.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgevit_export import api
from edgevit_export.ort import session


def main(model="shvit_s4", res=1024, runs=50):
    out = Path(tempfile.mkdtemp())
    rows = {}
    for passes in ("none", "default"):
        r = api.export(model, format="onnx", res=res, out=out / passes, passes=passes)
        ops = r.manifest["backend"]["ops"]
        rows[passes] = {"file": r.artifact, "reshape": ops.get("Reshape", 0), "transpose": ops.get("Transpose", 0),
                        "nodes": r.manifest["backend"]["nodes"], "parity_max_rel": r.checks["parity"]["max_rel"],
                        "convert_s": r.seconds["convert"], "times": []}
    sessions = {k: session(v["file"], threads=2, spinning=False) for k, v in rows.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, res, res)).astype(np.float32)
    for s in sessions.values():
        for _ in range(5):
            s.run(None, {"images": x})
    for _ in range(runs):  # interleaved so drift hits both equally
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"images": x})
            rows[k]["times"].append((time.perf_counter() - t) * 1e3)
    result = {"model": model, "res": res, "runs": runs, "threads": 2}
    for k, v in rows.items():
        ts = sorted(v.pop("times"))
        v.pop("file")
        v.update(median_ms=statistics.median(ts), p10_ms=ts[len(ts) // 10], p90_ms=ts[(9 * len(ts)) // 10])
        result[k] = v
    result["ratio_default_over_none"] = result["default"]["median_ms"] / result["none"]["median_ms"]
    dest = Path(__file__).parent / "results" / "passes_latency.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print("| passes | ONNX nodes | Reshape | Transpose | median ms | p10–p90 ms |")
    print("|---|---|---|---|---|---|")
    for k in ("none", "default"):
        v = result[k]
        print(f"| {k} | {v['nodes']} | {v['reshape']} | {v['transpose']} | {v['median_ms']:.1f} | "
              f"{v['p10_ms']:.1f}–{v['p90_ms']:.1f} |")
    print(f"default/none latency ratio: {result['ratio_default_over_none']:.3f}")


if __name__ == "__main__":
    main(*(int(a) if a.isdigit() else a for a in sys.argv[1:]))
