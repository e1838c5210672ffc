"""Export a list of (model, resolution, format[, precision]) and record the parity / structure figures.

    python benchmarks/parity_sweep.py                # SHViT S1–S3 at 224/512 + S4 at 1024, ONNX and Core ML
    python benchmarks/parity_sweep.py litv2_s:1024:coreml edgevit_s:512:onnx shvit_s1:224:coreml:fp32
    python benchmarks/parity_sweep.py --zoo 224,512,1024 [--skip-passed] [--family SHViT]
    python benchmarks/parity_sweep.py --report      # one row per model from parity.json
    python benchmarks/parity_sweep.py --features 1024,768x1344   # every model's backbone, ONNX + Core ML fp32
    python benchmarks/parity_sweep.py --features-report          # one row per model from features.json

Every parity figure is the saved artifact run by its format's runner (onnxruntime; the Core ML
reference runner for .mlpackage, fp16 programs in fp16) against PyTorch fp32; ``program`` is the
rewritten torch program handed to the converter. Writes benchmarks/results/parity.json after every
export (merged with earlier runs, so an interrupted sweep keeps what it measured) and prints a
markdown table. An export that raises is recorded with its error and the sweep goes on.

``--features``: the backbone exports (``export --features``, every output) of every model at the
given sizes, to ONNX and to Core ML fp32 (in the reference runner), each output held to 1e-4 of its
own scale; written to benchmarks/results/features.json (spec ``model:res:format:precision:features``).
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
          ["shvit_s4:1024:onnx", "shvit_s4:1024:coreml", "shvit_s4:1024:coreml:fp32"]


def feature_specs(resolutions: str, family: str | None) -> list[str]:
    return [f"{n}:{r}:{f}:features" for r in resolutions.split(",") for n in list_models(family)
            for f in ("onnx", "coreml:fp32")]


def features_report(results: dict) -> str:
    """Markdown, one row per model: its outputs (name, channels) and, per size and artifact, the worst
    per-output error."""
    from edgevit_export.features import feature_info
    from edgevit_export.measure import skeleton
    from edgevit_export.registry import get_model_info

    sizes = sorted({_split(k)[1] for k in results}, key=lambda r: [int(v) for v in r.split("x")])
    kinds = ("onnx", "coreml:fp32", "coreml:fp32:tensor")
    titles = {"onnx": "ONNX", "coreml:fp32": "Core ML fp32", "coreml:fp32:tensor": "Core ML fp32 tensor input"}
    kinds = [k for k in kinds if any(_split(key)[2] == k for key in results)]
    head = [f"{r} {titles[k]}" for r in sizes for k in kinds]
    lines = ["| model | outputs (stride: channels) | " + " | ".join(head) + " |",
             "|---|---|" + "---:|" * len(head)]
    for name in list_models():
        cells = []
        for r in sizes:
            for k in kinds:
                e = results.get(f"{name}:{r}:{k}:features")
                if e is None:
                    cells.append("—")
                elif e.get("passed"):
                    cells.append(f"{e['max_rel']:.1e}")
                elif e.get("error"):
                    cells.append("✗ refused" + (" (normalize_input)" if "normalize_input" in e["error"] else ""))
                else:
                    cells.append(f"✗ {e['max_rel']:.1e}")
        if all(c == "—" for c in cells):
            continue
        outs = ", ".join(f"s{f.stride}: {f.channels}" for f in feature_info(skeleton(get_model_info(name).builder)))
        lines.append(f"| {name} | {outs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def zoo_specs(resolutions: str, family: str | None) -> list[str]:
    names = list_models(family)
    return [f"{n}:{r}:{f}" for r in resolutions.split(",") for n in names for f in ("onnx", "coreml", "coreml:fp32")]


def report(results: dict) -> str:
    """Markdown, one row per model: worst error of each artifact kind over the resolutions measured
    (ONNX in onnxruntime; Core ML fp32 and fp16 packages in the reference runner), which
    resolutions passed, and the Core ML conversion and check times at the largest."""
    rows = {}
    for spec, r in results.items():
        name, res, kind = _split(spec)
        rows.setdefault(name, []).append((int(res), kind, r))
    fmt_e = lambda v: f"{v:.1e}" if v is not None else "—"  # noqa: E731
    lines = ["| model | resolutions | ONNX max rel | Core ML fp32 max rel | Core ML fp16 max rel (cosine) | "
             "Core ML convert / check s (largest res) | failed |", "|---|---|---:|---:|---:|---:|---|"]
    for name in sorted(rows):
        entries = sorted(rows[name], key=lambda e: e[0])
        ok = lambda kind: [r for _, k, r in entries if k == kind and r.get("passed")]  # noqa: E731
        worst = lambda rs, key: max((r[key] for r in rs if r.get(key) is not None), default=None)  # noqa: E731
        cos = min((r["cosine"] for r in ok("coreml:fp16")), default=None)
        passed = sorted({res for res, _, r in entries if r.get("passed")})
        big = [(res, r) for res, k, r in entries if k == "coreml:fp16" and r.get("passed")]
        failed = [f"{res} {k}: {r.get('error') or 'check failed'}" for res, k, r in entries if not r.get("passed")]
        times = f"{big[-1][1]['convert_s']} / {big[-1][1]['check_s']}" if big else "—"
        lines.append(f"| {name} | {', '.join(map(str, passed)) or '—'} | {fmt_e(worst(ok('onnx'), 'max_rel'))} | "
                     f"{fmt_e(worst(ok('coreml:fp32'), 'max_rel'))} | {fmt_e(worst(ok('coreml:fp16'), 'max_rel'))}"
                     f"{f' ({cos:.6f})' if cos is not None else ''} | "
                     f"{times} | "
                     f"{'; '.join(failed) or '—'} |")
    return "\n".join(lines)


def _split(spec: str) -> tuple[str, str, str]:
    """model:res:format[:precision][:features] → (model, res, kind) with kind onnx | coreml:fp16 |
    coreml:fp32 (a trailing ``:features`` is the backbone export)."""
    name, res, fmt, *rest = [p for p in spec.split(":") if p not in ("features", "tensor")]
    kind = fmt if fmt == "onnx" else f"{fmt}:{rest[0] if rest else 'fp16'}"
    return name, res, kind + (":tensor" if ":tensor" in spec else "")


def main(argv: list[str]) -> int:
    features = "--features" in argv or "--features-report" in argv or any(a.endswith(":features") for a in argv)
    dest = Path(__file__).parent / "results" / ("features.json" if features else "parity.json")
    results = json.loads(dest.read_text()) if dest.exists() else {}
    if "--report" in argv:
        print(report(results))
        return 0
    if "--features-report" in argv:
        print(features_report(results))
        return 0
    skip_passed = "--skip-passed" in argv
    argv = [a for a in argv if a != "--skip-passed"]
    family = argv[argv.index("--family") + 1] if "--family" in argv else None
    if "--features" in argv:
        specs = feature_specs(argv[argv.index("--features") + 1], family)
    elif "--zoo" in argv:
        specs = zoo_specs(argv[argv.index("--zoo") + 1], family)
    else:
        specs = [a for a in argv if ":" in a] or DEFAULT
    if skip_passed:
        specs = [s for s in specs if not results.get(s, {}).get("passed")]
    failed = 0
    print("| model | res | artifact | max rel (runner) | cosine | gated | program max rel | convert s | check s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in specs:
        name, res, kind = _split(spec)
        fmt, _, precision = kind.partition(":")
        t = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as d:
                r = api.export(name, format=fmt, res=res, out=d, precision=(precision or "fp16").split(":")[0],
                               features="all" if spec.endswith(":features") else None,
                               tensor_input=":tensor" in spec)
        except (EdgeExportError, CheckFailed, RuntimeError, ValueError, MemoryError) as e:
            failed += 1
            results[spec] = {"passed": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"| {name} | {res} | {kind} | error: {results[spec]['error']} |", flush=True)
            _save(dest, results)
            continue
        total = time.perf_counter() - t
        p, prog = r.checks["parity"], r.checks["program"]
        failed += not r.passed
        results[spec] = {"passed": r.passed, "max_rel": p["max_rel"], "cosine": p["cosine"], "gated": p["gated"],
                         "within_gate": p["within_gate"], "program_max_rel": prog["max_rel"],
                         "reference": p["reference"], "convert_s": round(r.seconds["convert"], 1),
                         "check_s": round(r.seconds["check"], 1), "total_s": round(total, 1),
                         "max_rank": r.checks.get("structure", {}).get("max_rank")}
        if "outputs" in p:   # a backbone: each output's error on its own scale
            results[spec]["outputs"] = {k: v["max_rel"] for k, v in p["outputs"].items()}
        print(f"| {name} | {res} | {kind} | {p['max_rel']:.1e} | {p['cosine']:.6f} | {p['gated']} | "
              f"{prog['max_rel']:.1e} | {r.seconds['convert']:.1f} | {r.seconds['check']:.1f} |", flush=True)
        _save(dest, results)
    return 1 if failed else 0


def _save(dest: Path, results: dict) -> None:
    dest.parent.mkdir(exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(results.items(), key=_order)), indent=2) + "\n")
    tmp.replace(dest)


def _order(item):
    name, res, kind = _split(item[0])
    return name, [int(v) for v in res.split("x")], kind


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or DEFAULT))
