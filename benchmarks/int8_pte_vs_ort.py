"""int8 ExecuTorch (.pte, XNNPACK) against our int8 QDQ ONNX in onnxruntime, in one run.

    python benchmarks/int8_pte_vs_ort.py                              # SHViT-S4, LITv2-S at 224 and 1024
    python benchmarks/int8_pte_vs_ort.py --models shvit_s1 --res 224
    python benchmarks/int8_pte_vs_ort.py --report                     # the README table

Both artifacts come from ``edgevit-export quantize`` (``--format pte`` and ``--format onnx``) with
the same synthetic calibration images (random weights: the latency is what is measured here, the
accuracy drop is measured on the trained shapes demo, see the README). Timing as in
``pte_vs_ort.py``: batch 1, 2 threads, warm-up, then rounds alternating the two runtimes so a slow
spell of the VM hits both; onnxruntime with all optimisations, sequential, no spinning.
Results are merged into benchmarks/results/int8_pte_vs_ort.json after every model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pte_vs_ort import CPU, _save, _time_both  # noqa: E402

from edgevit_export.calibration.quantize import quantize  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "int8_pte_vs_ort.json"


def measure(name: str, res: int, tmp: Path) -> dict:
    row: dict = {"model": name, "res": res}
    arts = {}
    for fmt in ("pte", "onnx"):
        t = time.perf_counter()
        r = quantize(name, res=res, calib="synthetic", calib_size=8, eval_size=4, sensitivity_samples=0,
                     format=fmt, out=tmp / fmt, force=True)
        row[f"{fmt}_quantize_s"] = round(time.perf_counter() - t, 1)
        row[f"{fmt}_scheme"] = r.scheme
        row[f"{fmt}_bytes"] = r.sizes["int8_bytes"]
        arts[fmt] = r.artifact
        if fmt == "pte":
            d = r.manifest["backend"]["delegation"]
            row["delegation"] = {k: d[k] for k in ("delegate_subgraphs", "nodes_portable", "portable_by_op",
                                                   "mac_share_delegated")}
        else:
            row["reduce_range"] = r.manifest["quantization"]["reduce_range"]
    row["timing"] = _time_both(arts["pte"], arts["onnx"])
    return row


def report(results: dict) -> str:
    lines = ["| model | res | XNNPACK delegates | int8 .pte median ms (p10–p90) | int8 ONNX/ORT median ms (p10–p90) "
             "| .pte / ORT | .pte MB | ONNX MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(results, key=lambda k: (results[k]["res"], k)):
        r = results[key]
        tm = r["timing"]
        span = lambda s: f"{s['median_ms']:.2f} ({s['p10_ms']:.2f}–{s['p90_ms']:.2f})"  # noqa: E731
        lines.append(f"| {r['model']} | {r['res']} | {r['delegation']['delegate_subgraphs']} | "
                     f"{span(tm['executorch'])} | {span(tm['ort'])} | {tm['ratio']:.2f} | "
                     f"{r['pte_bytes'] / 1e6:.1f} | {r['onnx_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="shvit_s4,litv2_s")
    ap.add_argument("--res", default="224,1024")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if a.report:
        print(report(results))
        return
    for res in [int(r) for r in a.res.split(",")]:
        for name in a.models.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                row = measure(name, res, Path(tmp))
            row["cpu"] = CPU
            results[f"{name}@{res}"] = row
            _save(results, RESULTS)
            print(f"{name}@{res}", f"ratio {row['timing']['ratio']:.2f}",
                  f"pte {row['timing']['executorch']['median_ms']:.1f} ms",
                  f"ort {row['timing']['ort']['median_ms']:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
