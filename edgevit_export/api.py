"""The Python API behind the CLI: every function returns data; nothing here prints."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .errors import EdgeExportError
from .measure import count_macs, count_params
from .passes import PassContext, resolve_passes, run_passes
from .passes.pipeline import PipelineResult
from .registry import ModelInfo, create_model, get_model_info, parse_resolution
from .weights import randomize_norm_stats

FORMATS = ("onnx", "coreml")
ONNX_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    model: str
    format: str
    res: tuple[int, int]
    artifact: Path
    manifest_path: Path
    manifest: dict
    pipeline: PipelineResult
    parity: dict | None = None
    checks: dict = field(default_factory=dict)
    random_init: bool = False
    seconds: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.get("passed", True) for c in self.checks.values())


def _tool_versions() -> dict:
    import importlib.metadata as md

    out = {"edgevit_export": __version__, "python": platform.python_version()}
    for pkg in ("torch", "onnx", "onnxruntime", "onnxsim", "coremltools"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def prepare_model(name: str, res, weights: str | None, distilled: bool | None, seed: int = 0):
    """Resolve a name, resolution and weights into (info, (h, w), eval model, random_init)."""
    info = get_model_info(name)
    hw = parse_resolution(res, info)
    model = create_model(name, weights=weights, distilled=distilled, seed=seed)
    if weights is None:
        randomize_norm_stats(model, seed)
    if hasattr(model, "prepare_for_export"):
        model.prepare_for_export()
    return info, hw, model.eval(), weights is None


def capture(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Capture once with torch.export (never jit.trace: it bakes shape arithmetic into ops)."""
    with torch.no_grad():
        return torch.export.export(model, (example,))


def export(
    name: str,
    *,
    format: str = "onnx",
    res: int | str | tuple[int, int] | None = None,
    weights: str | None = None,
    out: str | Path = "exports",
    output: str | Path | None = None,
    opset: int = 18,
    batch: int = 1,
    check: bool = True,
    force: bool = False,
    passes: str | list[str] | None = "default",
    distilled: bool | None = None,
    target: str = "iOS16",
    precision: str = "fp16",
    tensor_input: bool = False,
    labels: str | Path | None = None,
    logits: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Capture → passes → backend → check, for one model at one resolution.

    Writes ``OUT/MODEL-RES.{onnx,mlpackage}`` and ``OUT/MODEL-RES.json`` atomically (or
    ``output`` and its ``.json`` sibling). Bad input raises EdgeExportError before anything is
    written; a failed check is reported in the result (``passed`` false) with the artifact kept.
    """
    from .exporters import artifacts

    step = progress or (lambda _s: None)
    if format not in FORMATS:
        raise EdgeExportError(f"unknown format '{format}'; use one of: {', '.join(FORMATS)}")
    if batch < 1:
        raise EdgeExportError(f"--batch must be at least 1, got {batch}")
    if format == "coreml":
        from .exporters import coreml as coreml_backend

        coreml_opts = coreml_backend.validate_options(target=target, precision=precision, labels=labels,
                                                      output=output)
    pass_names = resolve_passes(passes, format, tensor_input=tensor_input)
    info = get_model_info(name)
    hw = parse_resolution(res, info)
    ext = ".onnx" if format == "onnx" else ".mlpackage"
    if output is not None:
        artifact = Path(output).expanduser()
        out_dir = artifacts.prepare_out_dir(artifact.parent)
    else:
        out_dir = artifacts.prepare_out_dir(out)
        artifact = out_dir / f"{name}-{artifacts.res_tag(hw)}{ext}"
    manifest_path = artifact.with_suffix(".json" if format == "onnx" else ".coreml.json")
    artifacts.check_free([artifact, manifest_path], force)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    step("build model")
    info, hw, model, random_init = prepare_model(name, hw, weights, distilled)
    example = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(0))
    if format == "coreml":
        num_classes = _num_classes(model, example)
        coreml_backend.class_labels(num_classes, coreml_opts["labels"])  # wrong count → error now
        if not logits:  # a classifier reports probabilities: softmax is part of the program
            model = WithSoftmax(model).eval()
    step("capture (torch.export)")
    ep = capture(model, example)
    timings["capture"] = time.perf_counter() - t0

    t = time.perf_counter()
    ctx = PassContext((example,), mean=info.mean, std=info.std)
    pipe = run_passes(ep, pass_names, ctx, progress=lambda n: step(f"pass {n}"))
    timings["passes"] = time.perf_counter() - t

    checks: dict[str, dict] = {}
    with artifacts.staging(out_dir) as tmp:
        staged = tmp / artifact.name
        t = time.perf_counter()
        if format == "onnx":
            from .exporters import onnx as onnx_backend

            step("convert to ONNX")
            backend = onnx_backend.to_onnx(pipe.program, pipe.example_input, staged, opset=opset)
            io = {"inputs": [{"name": onnx_backend.INPUT_NAME, "shape": list(pipe.example_input.shape),
                              "dtype": "float32"}],
                  "outputs": [{"name": onnx_backend.OUTPUT_NAME}]}
        else:
            step("convert to Core ML")
            backend, io = coreml_backend.to_coreml(pipe, staged, info=info, model_name=name, res=hw,
                                                   tensor_input=tensor_input, logits=logits,
                                                   params=count_params(model), num_classes=num_classes,
                                                   **coreml_opts)
        timings["convert"] = time.perf_counter() - t

        t = time.perf_counter()
        if check:
            step("check against PyTorch")
            if format == "onnx":
                checks["parity"] = _onnx_parity(staged, model, pipe).as_dict()
            else:
                checks.update(coreml_backend.check(staged, model, pipe, precision=coreml_opts["precision"],
                                                   tensor_input=tensor_input, logits=logits))
        timings["check"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0

        manifest = {
            "model": name,
            "family": info.family,
            "paper": info.paper,
            "format": format,
            "resolution": list(hw),
            "batch": batch,
            "artifact": artifact.name,
            "weights": str(weights) if weights else None,
            "random_init": random_init,
            "params": count_params(model),
            "macs": count_macs(model, hw, batch),
            "normalization": {"mean": list(info.mean), "std": list(info.std),
                              "in_graph": pipe.raw_input,
                              "input_range": f"0-{pipe.input_scale:g}" if pipe.raw_input else "normalized"},
            "io": io,
            "passes": [p.as_dict() for p in pipe.passes],
            "graph": {"before": pipe.before.as_dict(), "after": pipe.after.as_dict()},
            "backend": backend,
            "checks": checks,
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "tools": _tool_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest["sha256"] = artifacts.sha256(staged)
        staged_manifest = tmp / manifest_path.name
        staged_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        artifacts.commit(staged, artifact)
        artifacts.commit(staged_manifest, manifest_path)
    return ExportResult(name, format, hw, artifact, manifest_path, manifest, pipe,
                        parity=checks.get("parity"), checks=checks, random_init=random_init, seconds=timings)


class WithSoftmax(torch.nn.Module):
    """The model followed by softmax over classes (Core ML classifiers report probabilities)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x), dim=-1)


def _num_classes(model: torch.nn.Module, example: torch.Tensor) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    with torch.no_grad():
        return int(model(example[:1]).shape[-1])


def _onnx_parity(path: Path, model: torch.nn.Module, pipe: PipelineResult, count: int = 3):
    from .exporters.check import compare, seeded_inputs
    from .exporters.onnx import ort_session

    sess = ort_session(path)
    in_name = sess.get_inputs()[0].name
    xs = seeded_inputs(tuple(pipe.example_input.shape), count, pipe.input_scale if pipe.raw_input else None)
    outs, refs = [], []
    with torch.no_grad():
        for x in xs:
            outs.append(sess.run(None, {in_name: x.numpy()})[0])
            refs.append(model(pipe.reference_input(x)).numpy())
    return compare(outs, refs, ONNX_TOLERANCE)


@dataclass
class ModelSummary:
    name: str
    family: str
    paper: str
    default_res: int
    params: int
    macs: int
    paper_params_m: float | None
    paper_macs_m: float | None
    paper_top1: float | None


def summarize(name: str, res=None) -> ModelSummary:
    info = get_model_info(name)
    hw = parse_resolution(res, info)
    model = create_model(name)
    return ModelSummary(name, info.family, info.paper, info.default_res, count_params(model),
                        count_macs(model, hw), info.paper_params_m, info.paper_macs_m, info.paper_top1)


@dataclass
class ModelReport:
    summary: ModelSummary
    res: tuple[int, int]
    stages: list
    info: ModelInfo


def info(name: str, res=None) -> ModelReport:
    from .measure import stage_shapes

    meta = get_model_info(name)
    hw = parse_resolution(res, meta)
    model = create_model(name)
    s = ModelSummary(name, meta.family, meta.paper, meta.default_res, count_params(model), count_macs(model, hw),
                     meta.paper_params_m, meta.paper_macs_m, meta.paper_top1)
    return ModelReport(s, hw, stage_shapes(model, hw), meta)
