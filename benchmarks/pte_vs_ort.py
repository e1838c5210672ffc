"""ExecuTorch (.pte, XNNPACK) against our ONNX in onnxruntime, every zoo model, one run.

    python benchmarks/pte_vs_ort.py                       # the zoo at 224: delegation + latency
    python benchmarks/pte_vs_ort.py --models shvit_s4,litv2_s --res 1024
    python benchmarks/pte_vs_ort.py --parity 512           # exports at 512, parity + delegation, no timing
    python benchmarks/pte_vs_ort.py --report               # the README table from pte_vs_ort.json

Per model: the plain lowering's delegation (``--passes none``: what users get from
``to_edge_transform_and_lower`` on the captured program) and the default ``pte`` pipeline's, from
the exported ``.pte``'s manifest (parity checked: the saved program in ExecuTorch against PyTorch).
Timing (iphone12-like: batch 1, fp32, 2 threads, warm-up, then rounds alternating the two runtimes
so a slow spell of the VM hits both): ExecuTorch ``method.execute`` and an onnxruntime session
(all optimisations, sequential, no spinning) on the same seeded input; medians with p10–p90.
Results are merged into benchmarks/results/pte_vs_ort.json after every model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgevit_export import api
from edgevit_export.bench.env import collect
from edgevit_export.exporters import pte
from edgevit_export.ort import session
from edgevit_export.registry import list_models

RESULTS = Path(__file__).parent / "results" / "pte_vs_ort.json"
WARMUP, ROUNDS, PER_ROUND = 10, 10, 10
_env = collect(2, graph_optimization="all", execution_mode="sequential")
CPU = f"{_env.cpu} ({'AVX-512 VNNI' if 'avx512_vnni' in _env.cpu_flags else 'AVX2, no VNNI'})"


def _load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def _save(results: dict, path: Path = RESULTS) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def _stats(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)), "runs": len(ms)}


def _time_both(pte_path: Path, onnx_path: Path, threads: int = 2) -> dict:
    runner = pte.PteRunner(pte_path, threads)
    shape = runner.inputs[0]["shape"]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    xt = torch.from_numpy(x)
    sess = session(onnx_path, threads=threads, optimize=True, spinning=False)
    name = sess.get_inputs()[0].name
    et = lambda: runner.method.execute([xt])  # noqa: E731
    ort = lambda: sess.run(None, {name: x})  # noqa: E731
    for _ in range(WARMUP):
        et()
        ort()
    times = {"executorch": [], "ort": []}
    for r in range(ROUNDS):
        order = (("executorch", et), ("ort", ort)) if r % 2 == 0 else (("ort", ort), ("executorch", et))
        for key, fn in order:
            for _ in range(PER_ROUND):
                t = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t) * 1e3)
    out = {k: _stats(v) for k, v in times.items()}
    out["ratio"] = out["executorch"]["median_ms"] / out["ort"]["median_ms"]
    return out


def _summary(d: dict) -> dict:
    return {k: d[k] for k in ("delegate_subgraphs", "nodes_delegated", "nodes_portable", "portable_by_op",
                              "mac_share_delegated")}


def measure(name: str, res: int, tmp: Path, timing: bool) -> dict:
    row: dict = {"model": name, "res": res}
    t = time.perf_counter()
    r = api.export(name, format="pte", res=res, out=tmp, force=True)
    row["export_s"] = round(time.perf_counter() - t, 1)
    row["parity"] = {k: r.checks["parity"].get(k) for k in ("max_rel", "passed", "cosine")}
    row["structure"] = r.checks["structure"]["summary"]
    row["passed"] = r.passed
    row["after"] = _summary(r.manifest["backend"]["delegation"])
    if timing:
        info, hw, model, _ = api.prepare_model(name, res, None, None)
        x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
        row["before"] = _summary(pte.report(api.capture(model, x), x)["detail"])
        o = api.export(name, format="onnx", res=res, out=tmp, force=True, check=False)
        row["timing"] = _time_both(r.artifact, o.artifact)
    for f in tmp.iterdir():
        f.unlink()
    return row


def report(results: dict) -> str:
    lines = ["| model | res | delegates before → after | portable nodes before → after | left on portable (after) | "
             "parity max rel | .pte median ms (p10–p90) | ONNX/ORT median ms (p10–p90) | .pte / ORT |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for key in sorted(results, key=lambda k: (results[k]["res"], k)):
        r = results[key]
        b, a = r.get("before"), r["after"]
        tm = r.get("timing")
        left = ", ".join(f"{k} {v}" for k, v in a["portable_by_op"].items()) or "—"
        span = lambda s: f"{s['median_ms']:.2f} ({s['p10_ms']:.2f}–{s['p90_ms']:.2f})"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['res']} | {b['delegate_subgraphs'] if b else '—'} → {a['delegate_subgraphs']} | "
            f"{b['nodes_portable'] if b else '—'} → {a['nodes_portable']} | {left} | {r['parity']['max_rel']:.1e}"
            f"{'' if r['passed'] else ' FAIL'} | {span(tm['executorch']) if tm else '—'} | "
            f"{span(tm['ort']) if tm else '—'} | {tm['ratio']:.2f} |" if tm else
            f"| {r['model']} | {r['res']} | — → {a['delegate_subgraphs']} | — → {a['nodes_portable']} | {left} | "
            f"{r['parity']['max_rel']:.1e}{'' if r['passed'] else ' FAIL'} | — | — | — |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="all")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--parity", type=int, default=None, help="export at this resolution, no timing")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--skip-done", action="store_true")
    a = ap.parse_args()
    results = _load()
    if a.report:
        print(report(results))
        return
    names = list_models() if a.models == "all" else a.models.split(",")
    res, timing = (a.parity, False) if a.parity else (a.res, True)
    for name in names:
        key = f"{name}@{res}"
        if a.skip_done and key in results:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = measure(name, res, Path(tmp), timing)
            except Exception as e:   # record and go on
                row = {"model": name, "res": res, "error": f"{type(e).__name__}: {str(e)[:300]}", "passed": False,
                       "after": {"delegate_subgraphs": None, "nodes_portable": None, "portable_by_op": {}},
                       "parity": {"max_rel": float("nan")}}
        row["cpu"] = CPU
        results[key] = row
        _save(results)
        tm = row.get("timing")
        print(key, "passed" if row.get("passed") else f"FAILED {row.get('error', row.get('structure'))}",
              f"delegates {row['after']['delegate_subgraphs']}", f"ratio {tm['ratio']:.2f}" if tm else "", flush=True)


if __name__ == "__main__":
    main()
