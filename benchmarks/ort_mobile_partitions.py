"""ORT Mobile: how onnxruntime's usability checker partitions our ONNX for the phone execution
providers (CoreML ML Program, NNAPI), every zoo model, plain capture vs the ONNX default pipeline vs
the default plus the mobile rewrites.

    python benchmarks/ort_mobile_partitions.py [--res 224] [--models a,b]   # → results/ort_mobile.json
    python benchmarks/ort_mobile_partitions.py --report                     # the README table

Each variant is the captured program through the named passes (each proven exact by the pass
pipeline), converted with the ONNX exporter and checked with
``onnxruntime.tools.mobile_helpers.usability_checker`` (edgevit_export.ort_mobile).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgevit_export import api
from edgevit_export.exporters import onnx as onnx_format
from edgevit_export.passes import PassContext, resolve_passes, run_passes
from edgevit_export.registry import list_models

RESULTS = Path(__file__).parent / "results" / "ort_mobile.json"
MOBILE = ["static_shapes", "fold_constants", "fold_batchnorm", "batchnorm_as_affine", "rank_le5", "cancel_reshapes",
          "split_to_slices", "decompose_norms", "float_scalars"]


def measure(name: str, res: int) -> dict:
    info, hw, model, _ = api.prepare_model(name, res, None, None)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    ep = api.capture(model, x)
    row = {"model": name, "res": res}
    for key, names in (("plain", []), ("default", resolve_passes("default", "onnx")), ("mobile", MOBILE)):
        pipe = run_passes(ep, names, PassContext((x,), mean=info.mean, std=info.std)) if names else None
        refused = [p.name for p in pipe.passes if p.refused] if pipe else []
        eps = onnx_format.report(pipe.program if pipe else ep, x)["detail"]
        row[key] = {k: {"partitions": v["partitions"], "unsupported": v["unsupported_ops"]}
                    for k, v in eps.items() if k != "coreml_neuralnetwork"}
        row[key]["refused"] = refused
    return row


def report(results: dict) -> str:
    lines = ["| model | CoreML ML Program: plain → default → mobile | NNAPI: plain → default → mobile | "
             "NNAPI unsupported (mobile) |", "|---|---:|---:|---|"]
    for key in sorted(results):
        r = results[key]
        cm = " → ".join(str(r[v]["coreml_mlprogram"]["partitions"]) for v in ("plain", "default", "mobile"))
        nn = " → ".join(str(r[v]["nnapi"]["partitions"]) for v in ("plain", "default", "mobile"))
        left = ", ".join(f"{k} {v}" for k, v in r["mobile"]["nnapi"]["unsupported"].items()) or "—"
        lines.append(f"| {r['model']} | {cm} | {nn} | {left} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--models", default="all")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if a.report:
        print(report(results))
        return
    for name in (list_models() if a.models == "all" else a.models.split(",")):
        results[f"{name}@{a.res}"] = row = measure(name, a.res)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(name, {v: (row[v]["coreml_mlprogram"]["partitions"], row[v]["nnapi"]["partitions"])
                     for v in ("plain", "default", "mobile")}, flush=True)


if __name__ == "__main__":
    main()
