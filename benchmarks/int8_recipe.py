"""The default int8 recipe, chosen from trained demos: drop and logit SQNR of each candidate recipe.

Each DEMO is a `train-shapes` output folder (checkpoint, `calib/`, `test/`), e.g. the shapes demo
and the textures domain:

    edgevit-export train-shapes --out demo
    edgevit-export train-shapes --domain textures --out demo-textures --per-class 300 --epochs 12
    .venv/bin/python benchmarks/int8_recipe.py demo demo-textures

Recipes (onnxruntime QDQ, minmax, per-channel weights; the same calibration images):
- ``int8 attention, 8-bit``: everything onnxruntime can quantize, full-range weights (the recipe before);
- ``float attention, 8-bit``: the attention between its projections kept float;
- ``float attention, 7-bit`` (the default): the same with reduce_range weights;
- ``float attention, 7-bit, percentile``: percentile calibration.

Writes benchmarks/results/int8_recipe.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgevit_export.calibration import ort_int8  # noqa: E402
from edgevit_export.calibration.quantize import quantize  # noqa: E402

RECIPES = {
    "int8 attention, 8-bit": dict(float_attention=False, reduce_range=False, method="minmax"),
    "float attention, 8-bit": dict(float_attention=True, reduce_range=False, method="minmax"),
    "float attention, 7-bit (default)": dict(float_attention=True, reduce_range=True, method="minmax"),
    "float attention, 7-bit, percentile": dict(float_attention=True, reduce_range=True, method="percentile"),
}


def run(demo: Path, recipe: dict, out: Path, threads: int) -> dict:
    ckpt = next(demo.glob("*.pth"))
    model, _, res = ckpt.stem.rsplit("-", 2)
    region = ort_int8.attention_region
    if not recipe["float_attention"]:
        ort_int8.attention_region = lambda path: []
    try:
        r = quantize(model, res=int(res), weights=str(ckpt), calib=demo / "calib", calib_size=200,
                     eval_dir=demo / "test", method=recipe["method"], reduce_range=recipe["reduce_range"],
                     sensitivity_samples=0, out=out, force=True, threads=threads)
    finally:
        ort_int8.attention_region = region
    c = r.comparison
    return {"model": model, "res": int(res), "demo": demo.name, "float_top1": c.float_topk.top1,
            "int8_top1": c.quant_topk.top1, "drop": c.drop, "sqnr_db": c.agreement.sqnr_db,
            "agreement": c.agreement.top1_agree, "images": c.images}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demos", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "int8_recipe.json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for demo in a.demos:
            for name, recipe in RECIPES.items():
                row = {"recipe": name, **run(demo, recipe, Path(d) / "q", a.threads)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    a.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| demo | model | recipe | float top-1 | int8 top-1 | drop | logit SQNR dB | agreement |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['demo']} | {r['model']} | {r['recipe']} | {r['float_top1']:.1f} | {r['int8_top1']:.1f} | "
              f"{r['drop']:.1f} | {r['sqnr_db']:.1f} | {r['agreement']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
