"""`quantize` wall time against the plain path, side by side (issue 16: ≤ 1.5×).

The plain path is what a user would script without this toolkit: our float export (`export`,
with its parity check), onnxruntime's `quant_pre_process`, and `quantize_static` on the same
calibration images. `quantize` does those and then what the plain path leaves out: it compares
float and int8 on held-out images and writes the manifest. Same model, resolution and images;
the two paths alternate (plain, quantize, plain, quantize) so a slow spell of the VM hits both.

    .venv/bin/python benchmarks/quantize_time.py                  # shvit_s4 at 1024, 8 images
    .venv/bin/python benchmarks/quantize_time.py --res 224 --rounds 1

Writes benchmarks/results/quantize_time.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgevit_export import api  # noqa: E402
from edgevit_export.bench import env as bench_env  # noqa: E402
from edgevit_export.calibration.calibrate import calibration_source  # noqa: E402
from edgevit_export.calibration.ort_int8 import _pre_process  # noqa: E402
from edgevit_export.calibration.quantize import quantize  # noqa: E402
from edgevit_export.calibration.shapes import write_shapes  # noqa: E402
from edgevit_export.calibration.target import resolve_target  # noqa: E402


def plain(model: str, res: int, calib: Path, n: int, work: Path) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    t = {}
    t0 = time.perf_counter()
    r = api.export(model, format="onnx", res=res, out=work / "plain", force=True)
    t["export"] = time.perf_counter() - t0
    pre = work / "plain" / "pre.onnx"
    t1 = time.perf_counter()
    _pre_process(r.artifact, pre)
    t["pre_process"] = time.perf_counter() - t1
    target = resolve_target(model, res, None)
    src, _ = calibration_source(calib, target, n)
    xs = [it.x[None] for it in src]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(xs)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"images": x}

    t2 = time.perf_counter()
    quantize_static(str(pre), str(work / "plain" / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    t["quantize_static"] = time.perf_counter() - t2
    t["total"] = time.perf_counter() - t0
    return t


def ours(model: str, res: int, calib: Path, n: int, work: Path) -> dict:
    t0 = time.perf_counter()
    r = quantize(model, res=res, calib=calib, calib_size=n, out=work / "ours", force=True)
    total = time.perf_counter() - t0
    return {**{k: v for k, v in r.seconds.items() if k != "total"}, "total": total,
            "evaluation_images": r.evaluation.images}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shvit_s4")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--images", type=int, default=8, help="calibration images")
    ap.add_argument("--folder", type=int, default=40, help="images in the calibration folder")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantize_time.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        calib = work / "calib"
        write_shapes(calib, max(1, a.folder // 10), size=round(a.res / 0.875) + 1, seed=5, fmt="jpg")
        runs = {"plain": [], "quantize": []}
        for i in range(a.rounds):
            for name, fn in (("plain", plain), ("quantize", ours)):
                r = fn(a.model, a.res, calib, a.images, work)
                runs[name].append(r)
                print(f"round {i + 1} {name}: {r['total']:.1f} s  {json.dumps({k: round(v, 1) for k, v in r.items()})}",
                      flush=True)
    med = {k: float(np.median([r["total"] for r in v])) for k, v in runs.items()}
    out = {"model": a.model, "res": a.res, "calibration_images": a.images, "folder_images": a.folder,
           "machine": bench_env.machine_facts() if hasattr(bench_env, "machine_facts") else None,
           "runs": runs, "median_seconds": med, "ratio": med["quantize"] / med["plain"]}
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"quantize {med['quantize']:.1f} s vs plain {med['plain']:.1f} s: {out['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
