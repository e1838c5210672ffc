"""Export a list of (model, resolution, format) and record the parity / structure figures.

    python benchmarks/parity_sweep.py                # SHViT S1–S3 at 224/512 + S4 at 1024, ONNX and Core ML
    python benchmarks/parity_sweep.py litv2_s:1024:coreml edgevit_s:512:onnx
    python benchmarks/parity_sweep.py --zoo 224,512,1024 [--skip-passed] [--family SHViT]
    python benchmarks/parity_sweep.py --report      # one row per model from parity.json

Writes benchmarks/results/parity.json after every export (merged with earlier runs, so an
interrupted sweep keeps what it measured) and prints a markdown table. An export that raises is
recorded with its error and the sweep goes on.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from edgevit_export import api
from edgevit_export.errors import CheckFailed, EdgeExportError
from edgevit_export.registry import list_models

DEFAULT = [f"shvit_s{i}:{r}:{f}" for i in (1, 2, 3) for r in (224, 512) for f in ("onnx", "coreml")] + \
          ["shvit_s4:1024:onnx", "shvit_s4:1024:coreml"]


def zoo_specs(resolutions: str, family: str | None) -> list[str]:
    names = list_models(family)
    return [f"{n}:{r}:{f}" for r in resolutions.split(",") for n in names for f in ("onnx", "coreml")]


def report(results: dict) -> str:
    """Markdown, one row per model: worst ONNX / Core ML fp32 / fp16-emulated error over the
    resolutions measured, which resolutions passed, and the Core ML conversion time at the largest."""
    rows = {}
    for spec, r in results.items():
        name, res, fmt = spec.split(":")
        rows.setdefault(name, []).append((int(res), fmt, r))
    fmt_e = lambda v: f"{v:.1e}" if v is not None else "—"  # noqa: E731
    lines = ["| model | resolutions (ONNX + Core ML) | ONNX max rel | Core ML fp32 max rel | Core ML fp16-emulated "
             "max rel | Core ML convert s (largest res) | failed |", "|---|---|---:|---:|---:|---:|---|"]
    for name in sorted(rows):
        entries = sorted(rows[name], key=lambda e: e[0])
        ok = lambda fmt: [r for _, f, r in entries if f == fmt and r.get("passed")]  # noqa: E731
        worst = lambda rs, key: max((r[key] for r in rs if r.get(key) is not None), default=None)  # noqa: E731
        both = sorted({res for res, f, r in entries if r.get("passed")} &
                      {res for res, f, r in entries if f == "onnx" and r.get("passed")} &
                      {res for res, f, r in entries if f == "coreml" and r.get("passed")})
        big = [(res, r) for res, f, r in entries if f == "coreml" and r.get("passed")]
        failed = [f"{res} {f}: {r.get('error') or 'check failed'}" for res, f, r in entries if not r.get("passed")]
        lines.append(f"| {name} | {', '.join(map(str, both)) or '—'} | {fmt_e(worst(ok('onnx'), 'max_rel'))} | "
                     f"{fmt_e(worst(ok('coreml'), 'max_rel'))} | {fmt_e(worst(ok('coreml'), 'fp16_max_rel'))} | "
                     f"{big[-1][1]['convert_s'] if big else '—'} | {'; '.join(failed) or '—'} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    dest = Path(__file__).parent / "results" / "parity.json"
    results = json.loads(dest.read_text()) if dest.exists() else {}
    if "--report" in argv:
        print(report(results))
        return 0
    skip_passed = "--skip-passed" in argv
    argv = [a for a in argv if a != "--skip-passed"]
    family = argv[argv.index("--family") + 1] if "--family" in argv else None
    if "--zoo" in argv:
        specs = zoo_specs(argv[argv.index("--zoo") + 1], family)
    else:
        specs = [a for a in argv if ":" in a] or DEFAULT
    if skip_passed:
        specs = [s for s in specs if not results.get(s, {}).get("passed")]
    failed = 0
    print("| model | res | format | max rel (fp32) | fp16 emulated | cosine | convert s | total s |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in specs:
        name, res, fmt = spec.split(":")
        t = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as d:
                r = api.export(name, format=fmt, res=int(res), out=d)
        except (EdgeExportError, CheckFailed, RuntimeError, ValueError, MemoryError) as e:
            failed += 1
            results[spec] = {"passed": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"| {name} | {res} | {fmt} | error: {results[spec]['error']} |", flush=True)
            _save(dest, results)
            continue
        total = time.perf_counter() - t
        p, p16 = r.checks["parity"], r.checks.get("parity_fp16")
        failed += not r.passed
        results[spec] = {"passed": r.passed, "max_rel": p["max_rel"], "cosine": p["cosine"],
                         "fp16_max_rel": p16["max_rel"] if p16 else None,
                         "fp16_cosine": p16["cosine"] if p16 else None,
                         "fp16_within_gate": p16["within_gate"] if p16 else None,
                         "convert_s": round(r.seconds["convert"], 1), "total_s": round(total, 1),
                         "max_rank": r.checks.get("structure", {}).get("max_rank")}
        print(f"| {name} | {res} | {fmt} | {p['max_rel']:.1e} | {p16['max_rel']:.1e} |" if p16 else
              f"| {name} | {res} | {fmt} | {p['max_rel']:.1e} | — |", end="")
        print(f" {p['cosine']:.6f} | {r.seconds['convert']:.1f} | {total:.1f} |", flush=True)
        _save(dest, results)
    return 1 if failed else 0


def _save(dest: Path, results: dict) -> None:
    dest.parent.mkdir(exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(results.items(), key=_order)), indent=2) + "\n")
    tmp.replace(dest)


def _order(item):
    name, res, fmt = item[0].split(":")
    return name, int(res), fmt


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or DEFAULT))
