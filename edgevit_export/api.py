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
from .errors import CheckFailed, EdgeExportError
from .measure import count_macs, count_params, skeleton
from .passes import PassContext, resolve_passes, run_passes
from .passes.pipeline import PipelineResult
from .registry import ModelInfo, create_model, get_model_info, parse_resolution
from .weights import calibrate_norm_stats, randomize_norm_stats

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
        d = info.default_res  # calibrate at the export size, or the default one if that is larger (cost)
        calibrate_norm_stats(model, hw if hw[0] * hw[1] <= d * d else (d, d), seed, info.mean, info.std)
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
        out_dir = artifacts.check_out_dir(artifact.parent)
    else:
        out_dir = artifacts.check_out_dir(out)
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
            model = WithSoftmax(model).eval()  # (the checks compare the logits before it)
    step("capture (torch.export)")
    ep = capture(model, example)
    timings["capture"] = time.perf_counter() - t0

    t = time.perf_counter()
    ctx = PassContext((example,), mean=info.mean, std=info.std)
    pipe = run_passes(ep, pass_names, ctx, progress=lambda n: step(f"pass {n}"))
    timings["passes"] = time.perf_counter() - t
    if format == "coreml" and pipe.after.max_rank > 5:
        _refuse_high_rank(pipe, pass_names)
    contract = [p for p in pipe.passes if p.name == "normalize_input" and p.refused]
    if contract:  # the image input would reach the network unnormalised: never ship that
        raise CheckFailed(f"normalize_input could not be proven exact on this network ({contract[0].refused}); "
                          f"nothing was written — export with --tensor-input and normalise in the app")

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
                base = model.model if isinstance(model, WithSoftmax) else model
                checks.update(coreml_backend.check(staged, base, pipe, precision=coreml_opts["precision"],
                                                   tensor_input=tensor_input, logits=logits,
                                                   gate_fp16=not random_init))
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
            "pass_tolerance": pipe.tolerance,
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


def _refuse_high_rank(pipe: PipelineResult, pass_names: list[str]) -> None:
    """Core ML rejects rank > 5; say which tensor and which pass fixes it, before coremltools does."""
    from .passes.base import annotate, shape
    from .passes.rank_le5 import high_rank_nodes, source_of

    gm = pipe.program.module()
    annotate(gm, (pipe.example_input,))
    nodes = high_rank_nodes(gm)
    first = nodes[0] if nodes else None
    where = f"rank-{len(shape(first))} tensor {shape(first)} at {source_of(first)}" if first else "a rank > 5 tensor"
    refused = next((p.refused for p in pipe.passes if p.name == "rank_le5" and p.refused), None)
    if refused:
        raise EdgeExportError(f"Core ML supports tensors of rank ≤ 5, but the graph has {where} "
                              f"({len(nodes)} in all) and the rank_le5 pass could not rewrite it: {refused}")
    raise EdgeExportError(f"Core ML supports tensors of rank ≤ 5, but the graph has {where} ({len(nodes)} in all); "
                          f"the rank_le5 pass rewrites these: use --passes default or add rank_le5 "
                          f"(now: {','.join(pass_names) or 'none'})")


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
    params_agree: bool  # with the paper's printed figure (ModelInfo.params_agree)
    params_note: str  # why not, where they do not agree
    weights_note: str


def summarize(name: str, res=None) -> ModelSummary:
    return _summary(get_model_info(name), res)[0]


def _summary(info: ModelInfo, res) -> tuple[ModelSummary, tuple[int, int], torch.nn.Module]:
    """Params and MACs measured on a meta-device skeleton of the model (no weights needed)."""
    hw = parse_resolution(res, info)
    model = skeleton(info.builder)
    params = count_params(model)
    s = ModelSummary(info.name, info.family, info.paper, info.default_res, params,
                     count_macs(model, hw), info.paper_params_m, info.paper_macs_m, info.paper_top1,
                     info.params_agree(params), info.params_note, info.weights_note)
    return s, hw, model


@dataclass
class ModelReport:
    summary: ModelSummary
    res: tuple[int, int]
    stages: list
    info: ModelInfo


def info(name: str, res=None) -> ModelReport:
    from .measure import stage_shapes

    meta = get_model_info(name)
    s, hw, model = _summary(meta, res)
    return ModelReport(s, hw, stage_shapes(model, hw), meta)


# --- inspect: the mobile-unfriendliness report --------------------------------------------------

SOURCES = {
    "rank": "coremltools: Core ML supports tensors of rank ≤ 5 (MIL tensor rank limit)",
    "dynamic": "coremltools flexible-shape guide: static shapes let Core ML plan memory and pick the "
               "Neural Engine; shape arithmetic from x.shape becomes dynamic ops",
    "layout": "Apple, 'Deploying Transformers on the Apple Neural Engine' (2022), principle 1: use the "
              "4-D channels-first (B, C, 1, S) data format",
    "copies": "Apple, 'Deploying Transformers on the Apple Neural Engine' (2022), principle 3: minimise "
              "memory copies — reshapes and transposes",
    "paper": "SHViT (CVPR 2024), Sec. 3: memory-bound reshapes/permutes dominate attention latency on device",
}


@dataclass
class Finding:
    what: str
    count: int
    source: str
    examples: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    model: str
    format: str
    res: tuple[int, int]
    passes: list[str]
    before: dict
    after: dict
    findings_before: list[Finding]
    findings_after: list[Finding]


def _findings(gm, fmt: str) -> list[Finding]:
    from .passes.base import PERMUTE_OPS, RESHAPE_OPS, shape
    from .passes.rank_le5 import high_rank_nodes, source_of
    from .passes.static_shapes import _SIZE_OPS

    out = []
    high = high_rank_nodes(gm)
    out.append(Finding("tensors of rank > 5", len(high), SOURCES["rank"],
                       [f"{source_of(n)} {shape(n)}" for n in high[:3]]))
    dyn = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SIZE_OPS]
    out.append(Finding("dynamic shape ops (sym_size)", len(dyn), SOURCES["dynamic"],
                       [source_of(n) for n in dyn[:3]]))
    reshapes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in RESHAPE_OPS]
    perms = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in PERMUTE_OPS]
    out.append(Finding("reshape/view ops", len(reshapes), SOURCES["copies"],
                       sorted({source_of(n) for n in reshapes})[:3]))
    out.append(Finding("permute/transpose ops", len(perms), SOURCES["copies"],
                       sorted({source_of(n) for n in perms})[:3]))
    if fmt == "coreml":
        compute = [n for n in gm.graph.nodes if n.op == "call_function" and shape(n) is not None
                   and n.target not in RESHAPE_OPS | PERMUTE_OPS and len(shape(n)) not in (4,)
                   and len(shape(n)) > 2]
        out.append(Finding("compute ops on tensors that are not 4-D channels-first", len(compute),
                           SOURCES["layout"], sorted({source_of(n) for n in compute})[:3]))
    return out


def inspect(name: str, *, res=None, format: str = "onnx", passes: str | None = "default",
            weights: str | None = None, progress: Callable[[str], None] | None = None) -> InspectReport:
    """The mobile-unfriendliness report of a model's graph before and after the pass pipeline."""
    from .passes import graph_stats
    from .passes.base import annotate

    if format not in FORMATS:
        raise EdgeExportError(f"unknown format '{format}'; use one of: {', '.join(FORMATS)}")
    names = resolve_passes(passes, format)
    info_, hw, model, _ = prepare_model(name, res, weights, None)
    example = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    (progress or (lambda s: None))("capture")
    ep = capture(model, example)
    gm0 = ep.module()
    annotate(gm0, (example,))
    ctx = PassContext((example,), mean=info_.mean, std=info_.std)
    pipe = run_passes(ep, names, ctx, progress=progress)
    gm1 = pipe.program.module()
    annotate(gm1, (pipe.example_input,))
    return InspectReport(name, format, hw, names, graph_stats(gm0).as_dict(), graph_stats(gm1).as_dict(),
                         _findings(gm0, format), _findings(gm1, format))
