"""Export a list of (model, resolution, format) and record the parity / structure figures.

    python benchmarks/parity_sweep.py                # SHViT S1–S3 at 224/512 + S4 at 1024, ONNX and Core ML
    python benchmarks/parity_sweep.py litv2_s:1024:coreml edgevit_s:512:onnx

Writes benchmarks/results/parity.json (merged with earlier runs) and prints a markdown table.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from edgevit_export import api

DEFAULT = [f"shvit_s{i}:{r}:{f}" for i in (1, 2, 3) for r in (224, 512) for f in ("onnx", "coreml")] + \
          ["shvit_s4:1024:onnx", "shvit_s4:1024:coreml"]


def main(specs: list[str]) -> int:
    dest = Path(__file__).parent / "results" / "parity.json"
    results = json.loads(dest.read_text()) if dest.exists() else {}
    failed = 0
    print("| model | res | format | max rel (fp32) | fp16 emulated | cosine | convert s | total s |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in specs:
        name, res, fmt = spec.split(":")
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            r = api.export(name, format=fmt, res=int(res), out=d)
        total = time.perf_counter() - t
        p, p16 = r.checks["parity"], r.checks.get("parity_fp16")
        failed += not r.passed
        results[spec] = {"passed": r.passed, "max_rel": p["max_rel"], "cosine": p["cosine"],
                         "fp16_max_rel": p16["max_rel"] if p16 else None,
                         "convert_s": round(r.seconds["convert"], 1), "total_s": round(total, 1),
                         "max_rank": r.checks.get("structure", {}).get("max_rank")}
        print(f"| {name} | {res} | {fmt} | {p['max_rel']:.1e} | {p16['max_rel']:.1e} |" if p16 else
              f"| {name} | {res} | {fmt} | {p['max_rel']:.1e} | — |", end="")
        print(f" {p['cosine']:.6f} | {r.seconds['convert']:.1f} | {total:.1f} |", flush=True)
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or DEFAULT))
