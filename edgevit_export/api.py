"""The Python API behind the CLI: every function returns data; nothing here prints."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import __version__
from .calibration.data import Preprocess, PreprocessOverrides
from .errors import CannotRun, CheckFailed, EdgeExportError
from . import features as _features
from .exporters.check import (Gate, as_nchw, in_order, judge_outputs, raw_scale, reference_input, seeded_feeds,
                              torch_outputs, write_golden)
from .measure import count_macs, count_params, program_params, skeleton
from .passes import PassContext, resolve_passes, run_passes
from .passes.pipeline import PipelineResult
from .progress import Callback, emit
from .registry import ModelInfo, create_model, get_model_info, parse_resolution
from .weights import calibrate_norm_stats, randomize_norm_stats

PROGRAM_TOLERANCE = 1e-4


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
    for pkg in ("torch", "onnx", "onnxruntime", "onnxsim", "coremltools", "executorch", "litert-torch", "ai-edge-litert"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def prepare_model(name: str, res, weights: str | None, distilled: bool | None, seed: int = 0,
                  mean=None, std=None, features: bool = False, batch: int = 1, what: str = "export"):
    """Resolve a name, resolution and weights into (info, (h, w), eval model, random_init).
    ``mean``/``std``: the normalisation the inputs will have (default: the model's), for the
    BatchNorm statistics of a randomly initialised model. A size and ``batch`` that would not fit
    in memory are refused before anything is built (``memory.check_fits``; ``what`` the command)."""
    from .memory import check_fits

    info = get_model_info(name)
    hw = parse_resolution(res, info, features)   # a backbone (features) may take sizes its family pads
    check_fits(name, info, hw, batch, what, features)
    model = create_model(name, weights=weights, distilled=distilled, seed=seed)
    if weights is None:
        randomize_norm_stats(model, seed)
        d = info.default_res  # calibrate at the export size, or the default one if that is larger (cost)
        calibrate_norm_stats(model, hw if hw[0] * hw[1] <= d * d else (d, d), seed,
                             info.mean if mean is None else mean, info.std if std is None else std)
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
    layout: str = "nchw",
    crop_pct: float | str | None = None,
    interpolation: str | None = None,
    mean: str | tuple[float, float, float] | None = None,
    std: str | tuple[float, float, float] | None = None,
    features: str | None = None,
    progress: Callback | None = None,
) -> ExportResult:
    """Capture → passes → ``format.convert`` → ``format.load`` → parity + structure, one model at one
    resolution.

    The manifest records the eval transform an app must apply ("preprocess": the model's own
    crop_pct, interpolation, mean/std, or ``crop_pct``/``interpolation``/``mean``/``std`` given here
    for a model trained with other transforms). ``mean``/``std`` also set what the artifact expects:
    the normalisation ``normalize_input`` bakes into the graph (Core ML's image input) and the one
    the manifest's "normalization" states.

    Writes ``OUT/MODEL-RES<suffix>``, its manifest and its golden file atomically (or ``output``
    and siblings). Bad input raises EdgeExportError before anything is written; a failed check is
    reported in the result (``passed`` false) with the artifact kept. Format flags (``opset``;
    ``target``, ``precision``, ``tensor_input``, ``labels``, ``logits``) go to the format's
    ``validate_options``, which takes those that concern it.

    ``features``: export the backbone instead of the classifier — no pooling, no head; the outputs
    are the feature maps in ``model.feature_info`` (``"all"``, or names such as ``"s16,s32"``),
    named by stride, each checked against PyTorch on its own scale.
    """
    from . import exporters
    from .exporters import artifacts, bundle
    from .labels import read_labels
    from .weights import checkpoint_classes

    fmt = exporters.get(format)
    format = fmt.name
    overrides = PreprocessOverrides.parse(crop_pct, interpolation, mean, std)
    backend = fmt.backend()
    if batch < 1:
        raise EdgeExportError(f"--batch must be at least 1, got {batch}")
    if features is not None and labels is not None:
        raise EdgeExportError("--labels names a classifier's classes; a --features export has no classifier "
                              "(drop --labels)")
    # a classifier's names may repeat (ImageNet-1k's own list, as the labels file we write beside an
    # export, names 'crane' twice); only a folder-to-class mapping needs them unique
    given = read_labels(labels, unique=False) if labels is not None else None
    options = backend.validate_options(output=output, opset=opset, target=target, precision=precision,
                                       labels=given, tensor_input=tensor_input, logits=logits, layout=layout,
                                       features=features is not None)
    pass_names = resolve_passes(passes, format, tensor_input=options.get("tensor_input", False))
    if not options.get("tensor_input", True) and "normalize_input" not in pass_names:
        pass_names.append("normalize_input")  # an image input takes raw pixels: part of the input contract
    info = get_model_info(name)
    name = info.name                         # SHViT_S4, shvit-s4, shvit_s4.in1k → shvit_s4
    hw = parse_resolution(res, info, features=features is not None)
    picked = _features.select(skeleton(info.builder), features) if features is not None else None
    pre = Preprocess.of_model(info, hw, overrides)
    if output is not None:
        artifact = Path(output).expanduser()
        out_dir = artifacts.check_out_dir(artifact.parent)
    else:
        out_dir = artifacts.check_out_dir(out)
        artifact = out_dir / f"{name}-{artifacts.res_tag(hw)}{fmt.suffix}"
    manifest_path, golden_path = fmt.manifest_path(artifact), fmt.golden_path(artifact)
    artifacts.check_free([artifact, manifest_path, golden_path, *bundle.side_paths(manifest_path)], force)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    emit(progress, "build model")
    info, hw, model, random_init = prepare_model(name, hw, weights, distilled, mean=pre.mean, std=pre.std,
                                                 features=picked is not None, batch=batch)
    example = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(0))
    classifier = model
    if picked is not None:
        model = _features.Backbone(classifier, picked)
    num_classes = _num_classes(model, example) if picked is None else 0
    if given is not None and len(given) != num_classes:
        raise EdgeExportError(f"--labels has {len(given)} names but the model has {num_classes} classes; "
                              "give exactly one name per class, one per line")
    names = None if picked is not None else bundle.resolve_labels(
        num_classes, given, f"--labels {labels}", checkpoint_classes(weights) if weights else None)
    if names is not None and "labels" in options:
        options["labels"] = names.names          # a Core ML classifier carries them inside
    emit(progress, "capture (torch.export)")
    ep = capture(model, example)
    params_used = program_params(ep)   # before the passes fold anything: the parameters the outputs need
    timings["capture"] = time.perf_counter() - t0

    t = time.perf_counter()
    ctx = PassContext((example,), mean=pre.mean, std=pre.std)
    pipe = run_passes(ep, pass_names, ctx, progress=progress)
    timings["passes"] = time.perf_counter() - t
    if fmt.max_rank and pipe.after.max_rank > fmt.max_rank:
        _refuse_high_rank(pipe, pass_names, fmt)
    contract = [p for p in pipe.passes if p.name == "normalize_input" and p.refused]
    if contract:  # the image input would reach the network unnormalised: never ship that
        raise CheckFailed(f"normalize_input could not be proven exact on this network ({contract[0].refused}); "
                          f"nothing was written — export with --tensor-input and normalise in the app")
    normalization = {"mean": list(pre.mean), "std": list(pre.std), "in_graph": pipe.raw_input,
                     "input_range": f"0-{pipe.input_scale:g}" if pipe.raw_input else "normalized",
                     "layout": options.get("layout", "nchw")}
    if pipe.raw_input:
        pre = replace(pre, raw_scale=pipe.input_scale)     # the app feeds raw pixels; the graph normalises
    params = count_params(classifier) if picked is None else params_used
    meta = exporters.Meta(name, info.family, info.paper, hw, params, pre.mean, pre.std,
                          [p.name for p in pipe.passes], num_classes, pre.describe(),
                          features=model.features if picked is not None else None)

    checks: dict[str, dict] = {}
    golden_kept = 0
    with artifacts.staging(out_dir) as tmp:
        staged = tmp / artifact.name
        t = time.perf_counter()
        emit(progress, f"convert to {fmt.title}")
        facts = backend.convert(pipe.program, pipe.example_input, staged, options, meta)
        timings["convert"] = time.perf_counter() - t

        t = time.perf_counter()
        if check:
            emit(progress, f"check the saved {fmt.title} artifact against PyTorch")
            checks["structure"] = backend.structure(backend.describe(staged), options)
            try:
                runner = backend.load(staged)
                feeds = seeded_feeds(runner.inputs, 3, pipe.input_scale if pipe.raw_input else None)
                in_name = runner.inputs[0]["name"]
                refs = [torch_outputs(model, reference_input(f[in_name], normalization)) for f in feeds]
                outs = [runner.numeric(f) for f in feeds]
            except CannotRun as e:   # the artifact is written; the check could not run it
                checks["parity"] = {"passed": False, "summary": str(e)}
            else:
                compared = model.output_names if picked is not None else list(outs[0])[:1]
                checks["parity"] = judge_outputs([in_order(o, compared) for o in outs], refs, compared,
                                                 backend.gate(options, trained=not random_init),
                                                 f"pytorch fp32 ({runner.runtime}, saved artifact, {', '.join(compared)})")
                checks["program"] = _program_parity(pipe, feeds, refs, compared, in_name, normalization)
                golden_kept = write_golden(tmp / golden_path.name, feeds, refs, compared)
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
            "params": meta.params,
            "macs": count_macs(model, hw, batch),
            "task": "features" if picked is not None else "classification",
            "features": [f.as_dict() for f in model.features] if picked is not None else None,
            "padding": info.features_pad if picked is not None and (hw[0] % info.res_multiple or
                                                                   hw[1] % info.res_multiple) else None,
            "normalization": normalization,
            "preprocess": pre.as_dict(),
            "io": facts.pop("io"),            # completed by bundle.stage
            "passes": [p.as_dict() for p in pipe.passes],
            "pass_tolerance": pipe.tolerance,
            "graph": {"before": pipe.before.as_dict(), "after": pipe.after.as_dict()},
            "backend": facts,
            "checks": checks,
            "gate": asdict(backend.gate(options, trained=not random_init)),
            "golden": {"file": golden_path.name, "samples": golden_kept} if golden_kept else None,
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "tools": _tool_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest["sha256"] = artifacts.sha256(staged)
        side, stale = bundle.stage(tmp, manifest, manifest_path, names,         # io, labels file, MODEL-RES.md
                                   [f.as_dict() for f in model.features] if picked is not None else None)
        staged_manifest = tmp / manifest_path.name
        staged_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        artifacts.commit_all([(staged, artifact)] + ([(tmp / golden_path.name, golden_path)] if golden_kept else [])
                             + side + [(staged_manifest, manifest_path)], force,
                             stale=(() if golden_kept else (golden_path,)) + stale)
    return ExportResult(name, format, hw, artifact, manifest_path, manifest, pipe,
                        parity=checks.get("parity"), checks=checks, random_init=random_init, seconds=timings)


def _program_parity(pipe: PipelineResult, feeds, refs, names: list[str], in_name: str, normalization: dict) -> dict:
    """Second opinion, cheap: the rewritten torch program handed to the converter, in fp32 —
    separates what the passes did from what the converter and runtime did."""
    gm = pipe.program.module()
    outs = [torch_outputs(gm, as_nchw(f[in_name], normalization)) for f in feeds]
    return judge_outputs(outs, refs, names, Gate(PROGRAM_TOLERANCE), "pytorch fp32 (rewritten torch program, "
                         "as handed to the converter)")


def _refuse_high_rank(pipe: PipelineResult, pass_names: list[str], fmt) -> None:
    """A runtime's rank limit: say which tensor and which pass fixes it, before the converter does."""
    from .passes.base import annotate, shape
    from .passes.rank_le5 import high_rank_nodes, source_of

    gm = pipe.program.module()
    annotate(gm, (pipe.example_input,))
    nodes = high_rank_nodes(gm)
    first = nodes[0] if nodes else None
    where = f"rank-{len(shape(first))} tensor {shape(first)} at {source_of(first)}" if first else "a rank > 5 tensor"
    refused = next((p.refused for p in pipe.passes if p.name == "rank_le5" and p.refused), None)
    lim = f"{fmt.title} supports tensors of rank ≤ {fmt.max_rank}"
    if refused:
        raise EdgeExportError(f"{lim}, but the graph has {where} ({len(nodes)} in all) and the rank_le5 pass "
                              f"could not rewrite it: {refused}")
    raise EdgeExportError(f"{lim}, but the graph has {where} ({len(nodes)} in all); "
                          f"the rank_le5 pass rewrites these: use --passes default or add rank_le5 "
                          f"(now: {','.join(pass_names) or 'none'})")


def _num_classes(model: torch.nn.Module, example: torch.Tensor) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    with torch.no_grad():
        return int(model(example[:1]).shape[-1])


# --- run and check: any artifact, through its format's Runner ----------------------------------

def load(artifact: str | Path):
    """The Runner of an artifact (``.onnx``, ``.mlpackage``): numpy dict in, numpy dict out."""
    from . import exporters

    return exporters.load(artifact)


def _read_manifest(artifact: Path, fmt, required: bool) -> dict | None:
    path = fmt.manifest_path(artifact)
    if not path.is_file():
        if required:
            raise EdgeExportError(f"no manifest beside {artifact} (expected {path.name}); check needs the manifest "
                                  "edgevit-export writes with every artifact — re-export it")
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeExportError(f"manifest {path} is not readable JSON ({type(e).__name__}); re-export the artifact") from None
    if not isinstance(manifest, dict) or not all(k in manifest for k in ("model", "resolution", "normalization")):
        raise EdgeExportError(f"{path} is not a manifest edgevit-export wrote (no model, resolution, normalization); "
                              "re-export the artifact")
    return manifest


@dataclass
class CheckReport:
    artifact: Path
    format: str
    model: str
    runtime: str
    reference: str            # "golden file" or the checkpoint the outputs were recomputed from
    parity: dict
    sha256_matches: bool

    @property
    def passed(self) -> bool:
        return bool(self.parity.get("passed"))


def check(artifact: str | Path, *, weights: str | None = None, progress: Callback | None = None) -> CheckReport:
    """Re-run an artifact's parity check: its Runner on the golden inputs against the golden PyTorch
    outputs, or (with ``weights``) against the PyTorch model rebuilt from the manifest and that
    checkpoint. Held to the gate the manifest records (an fp16 gate applies once weights are given)."""
    from . import exporters
    from .exporters import artifacts
    from .exporters.check import read_golden

    path = Path(artifact).expanduser()
    fmt = exporters.of_artifact(path)
    manifest = _read_manifest(path, fmt, required=True)
    golden = fmt.golden_path(path)
    if weights is None and not golden.is_file():
        raise EdgeExportError(f"no golden file beside {path} (expected {golden.name}); pass --weights CKPT to "
                              "check against the checkpoint, or re-export without --no-check")
    emit(progress, f"load {fmt.title} runner")
    runner = exporters.load(path)
    in_name = runner.inputs[0]["name"]
    if golden.is_file():
        feeds, refs, names = read_golden(golden)
        source = f"golden file {golden.name}"
    else:
        feeds = seeded_feeds(runner.inputs, 3, raw_scale(manifest["normalization"]))
        refs, names = None, None
        source = ""
    g = manifest.get("gate") or {}
    gate = Gate(g.get("tolerance", PROGRAM_TOLERANCE), g.get("min_cosine"), g.get("gated", True), g.get("note", ""))
    if weights is not None:
        emit(progress, "rebuild the PyTorch model")
        _, _, model, _ = prepare_model(manifest["model"], tuple(manifest["resolution"]), weights, None,
                                       features=bool(manifest.get("features")))
        if manifest.get("features"):   # a backbone export: the same outputs of the same model
            model = _features.Backbone(model, _features.select(model, ",".join(f["name"] for f in manifest["features"])))
            names = names or model.output_names
        refs = [torch_outputs(model, reference_input(f[in_name], manifest["normalization"])) for f in feeds]
        source = f"PyTorch {manifest['model']} with {weights}" + (f" on the inputs of {golden.name}" if names else "")
        gate = Gate(gate.tolerance, gate.min_cosine, gated=True)
    emit(progress, "run the artifact")
    outs = [runner.numeric(f) for f in feeds]
    compared = names or list(outs[0])[:1]
    if len(outs[0]) < len(compared) or (len(compared) == 1 and compared[0] not in outs[0]):
        raise EdgeExportError(f"{path.name} has no output '{compared[-1]}' that the golden file holds; "
                              "the artifact does not belong to this golden file — re-export it")
    parity = judge_outputs([in_order(o, compared) for o in outs], refs, compared, gate,
                           f"{source} ({runner.runtime}, {', '.join(compared)})")
    return CheckReport(path, fmt.name, manifest.get("model", "?"), runner.runtime, source, parity,
                       manifest.get("sha256") == artifacts.sha256(path))


@dataclass
class Prediction:
    source: str                        # the image file, or "seeded input"
    top: list[tuple[str, float]]       # (label, probability), best first


@dataclass
class OutputStats:
    name: str
    shape: list[int]
    min: float
    max: float
    mean: float
    std: float


@dataclass
class RunReport:
    artifact: Path
    format: str
    runtime: str
    seeded: bool
    preprocess: str
    predictions: list[Prediction]
    outputs: list[OutputStats]
    probabilities: str                 # where the probabilities come from (the classifier, or softmax of logits)
    seconds: float
    random_init: bool                  # the manifest says the weights were random


def run(artifact: str | Path, *, images: list[str | Path] | None = None, top: int = 5,
        crop_pct: float | str | None = None, interpolation: str | None = None,
        mean: str | tuple[float, float, float] | None = None, std: str | tuple[float, float, float] | None = None,
        progress: Callback | None = None) -> RunReport:
    """Run an artifact on image files (with the preprocessing its manifest records, or
    ``crop_pct``/``interpolation``/``mean``/``std`` given here) or, without images, on one seeded
    input; the top-k labels with probabilities, and each output's statistics."""
    import numpy as np

    from . import exporters
    from .calibration.data import CorruptImage, load_image
    from .exporters.bundle import labels_beside
    from .labels import imagenet_labels

    if top < 1:
        raise EdgeExportError(f"--top must be at least 1, got {top}")
    overrides = PreprocessOverrides.parse(crop_pct, interpolation, mean, std)
    path = Path(artifact).expanduser()
    fmt = exporters.of_artifact(path)
    manifest = _read_manifest(path, fmt, required=False) or {}
    files = [Path(p).expanduser() for p in images or []]
    for f in files:
        if not f.is_file():
            raise EdgeExportError(f"--image file not found: {f}")
    emit(progress, f"load {fmt.title} runner")
    runner = exporters.load(path)
    spec = runner.inputs[0]
    nhwc = spec.get("layout") == "nhwc"
    batch, hw = int(spec["shape"][0]), tuple(int(d) for d in (spec["shape"][1:3] if nhwc else spec["shape"][2:4]))
    norm = manifest.get("normalization") or {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                              "in_graph": spec.get("kind") == "image", "input_range": "0-255"}
    raw = raw_scale(norm)
    if raw is not None and overrides.normalization:
        raise EdgeExportError(f"{path.name} normalises inside its graph (mean {norm.get('mean')} std "
                              f"{norm.get('std')}); --mean/--std cannot change that: re-export it with --mean/--std")
    pre = Preprocess.from_manifest({**manifest, "normalization": norm}, hw, raw_scale=raw, overrides=overrides)
    samples: list[tuple[str, np.ndarray]] = []
    for f in files:
        try:
            chw = pre.image(load_image(f))
            samples.append((str(f), chw.transpose(1, 2, 0) if nhwc else chw))   # NHWC artifacts take H, W, C
        except CorruptImage as e:
            raise EdgeExportError(f"--image {f} is not a readable image ({e})") from None
    seeded = not samples
    described = pre.describe()
    if seeded:
        x = seeded_feeds(runner.inputs, 1, raw)[0][spec["name"]]
        samples = [("seeded input", s) for s in x]
        described = ("one seeded input (no --image): " +
                     (f"random pixels 0-{raw:g}" if raw is not None else "N(0, 1) in place of a normalised image"))
    t = time.perf_counter()
    results: list[dict] = []
    for i in range(0, len(samples), batch):
        chunk = [s for _, s in samples[i:i + batch]]
        chunk += [chunk[-1]] * (batch - len(chunk))       # a fixed-batch artifact: pad with the last image
        out = runner({spec["name"]: np.stack(chunk).astype(np.float32)})
        n = min(batch, len(samples) - i)
        results += [{k: v[j] for k, v in out.items()} for j in range(n)]
    seconds = time.perf_counter() - t
    emit(progress, "done")
    probs_name, labels, how = _probabilities(runner, results[0])
    if labels is None and probs_name is not None:
        n = results[0][probs_name].shape[-1]
        named = labels_beside(fmt.manifest_path(path), manifest)     # the labels file the export wrote
        labels = (named if named and len(named) == n else imagenet_labels() if n == 1000
                  else [f"class {k}" for k in range(n)])
    predictions = []
    for (src, _), r in zip(samples, results):
        if probs_name is None:
            break
        p = r[probs_name].astype(np.float64)
        if how.startswith("softmax"):
            p = np.exp(p - p.max())
            p /= p.sum()
        order = np.argsort(-p)[:top]
        predictions.append(Prediction(src, [(labels[k], float(p[k])) for k in order]))
    stats = []
    for name in results[0]:
        v = np.stack([r[name] for r in results])
        if v.dtype.kind in "fiu":
            v = v.astype(np.float64)
            stats.append(OutputStats(name, list(v.shape), float(v.min()), float(v.max()), float(v.mean()),
                                     float(v.std())))
    return RunReport(path, fmt.name, runner.runtime, seeded, described, predictions, stats, how, seconds,
                     bool(manifest.get("random_init")))


def _probabilities(runner, result: dict) -> tuple[str | None, list[str] | None, str]:
    """Which output holds class scores: a classifier's probabilities, else a 1-D logits output."""
    if getattr(runner, "classifier", False):
        return runner.probabilities_name, runner.labels, "the classifier's probabilities"
    vec = [k for k, v in result.items() if getattr(v, "ndim", 0) == 1 and v.dtype.kind == "f"]
    if len(vec) == 1:
        return vec[0], getattr(runner, "labels", None), f"softmax of '{vec[0]}'"
    return None, None, "no class scores (feature outputs)"


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
    features: list = field(default_factory=list)   # (Feature, measured output shape) for --features


def info(name: str, res=None) -> ModelReport:
    from .measure import feature_shapes, stage_shapes

    meta = get_model_info(name)
    s, hw, model = _summary(meta, res)
    return ModelReport(s, hw, stage_shapes(model, hw), meta,
                       list(zip(_features.feature_info(model), feature_shapes(model, hw))))


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
    runtime: dict | None = None      # the format's own partition report: {"title", "before", "after"}


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
            weights: str | None = None, progress: Callback | None = None) -> InspectReport:
    """The mobile-unfriendliness report of a model's graph before and after the pass pipeline."""
    from .passes import graph_stats
    from .passes.base import annotate

    from . import exporters

    backend = exporters.get(format).backend()
    backend.validate_options()              # a missing extra is one line, before any work
    names = resolve_passes(passes, format)
    info_, hw, model, _ = prepare_model(name, res, weights, None, what="inspect")
    example = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    emit(progress, "capture")
    ep = capture(model, example)
    gm0 = ep.module()
    annotate(gm0, (example,))
    ctx = PassContext((example,), mean=info_.mean, std=info_.std)
    pipe = run_passes(ep, names, ctx, progress=progress)
    gm1 = pipe.program.module()
    annotate(gm1, (pipe.example_input,))
    runtime = None
    if hasattr(backend, "report"):   # how the runtime partitions the program, before and after the passes
        emit(progress, "partition before the passes")
        before = backend.report(ep, example)
        emit(progress, "partition after the passes")
        after = backend.report(pipe.program, pipe.example_input)
        runtime = {"title": before["title"], "before": before, "after": after}
    return InspectReport(name, format, hw, names, graph_stats(gm0).as_dict(), graph_stats(gm1).as_dict(),
                         _findings(gm0, format), _findings(gm1, format), runtime)
