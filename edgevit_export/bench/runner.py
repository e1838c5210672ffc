"""The bench command: check everything (:mod:`.plan`), then for each model × resolution export it
through the cache (:mod:`.cache`) and time it under the protocol (:mod:`.timing`). Never prints.

What is timed is what users ship: a model name is exported through ``edgevit_export.api.export``
into the cache, and that very file is loaded into an onnxruntime session (sequential, CPU, all
graph optimisations, the protocol's intra-op threads). ``--runtime torch`` times the eager PyTorch
model the same way. Progress goes through an optional callback, each task named "model@res: …".
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import EdgeExportError, OutputError
from ..progress import Callback, emit, prefixed
from .cache import cached_export, default_cache_dir
from .env import collect
from .onnx_facts import onnx_graph_macs, onnx_input, sibling_manifest
from .plan import Plan, parse_models, parse_res_list, plan
from .protocols import Protocol, get_protocol
from .results import SPREAD, BenchResult, Timing, timing_of
from .timing import Measurement, make_input, ort_runner, time_callable, time_torch

RUNTIMES = ("ort", "torch", "executorch", "litert")
# the format each exported runtime times (torch times the eager model)
RUNTIME_FORMAT = {"ort": "onnx", "executorch": "pte", "litert": "tflite"}


def run_bench(models: str | list[str], res: str | int | list | None = None, *, protocol: str = "iphone12",
              runtime: str = "ort", threads: int | None = None, runs: int | None = None, passes: str = "default",
              cache_dir: str | Path | None = None, max_seconds: float | None = None, features: str | None = None,
              progress: Callback | None = None) -> BenchResult:
    """Time every model × resolution under ``protocol``; returns a :class:`BenchResult`.

    ``features``: time each model's backbone (``export --features``: ``"all"`` or names such as
    ``"s16,s32"``) instead of the classifier.

    Everything the user typed is checked first (protocol, runtime, counts, names, files,
    resolutions, passes); a mistake raises ``EdgeExportError`` before any export or timing.
    """
    from ..passes import resolve_passes

    t_start = time.perf_counter()
    proto = get_protocol(protocol)
    runtimes = [r.strip() for r in runtime.split(",") if r.strip()] if isinstance(runtime, str) else list(runtime)
    if "coreml" in runtimes:   # the reference runner checks packages; it says nothing about Core ML's speed
        raise EdgeExportError("Core ML packages run here only in the reference runner, which executes them to "
                              "check their numbers, not to time them (there is no Core ML runtime on Linux); time "
                              ".mlpackage files on a device (Xcode's Performance report), or use --runtime ort | "
                              "executorch | litert | torch")
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise EdgeExportError(f"unknown runtime '{unknown[0] if unknown else runtime}'; use one of: "
                              f"{', '.join(RUNTIMES)} (or several, comma-separated: ort,executorch,litert)")
    runtimes = list(dict.fromkeys(runtimes))
    if runs is not None and runs < 1:
        raise EdgeExportError(f"--runs must be at least 1, got {runs}")
    from ..calibration.options import check_threads

    check_threads(threads)
    if max_seconds is not None and max_seconds <= 0:
        raise EdgeExportError(f"--max-seconds must be positive, got {max_seconds:g}")
    from ..exporters import get as get_format

    for r in runtimes:
        if r in ("executorch", "litert"):
            get_format(RUNTIME_FORMAT[r]).backend().validate_options()   # missing runtime: the install line
        resolve_passes(passes, RUNTIME_FORMAT.get(r, "onnx"))
    n_threads = threads or proto.threads
    specs = parse_models(models)
    by_name = [r for r in runtimes if r in ("executorch", "litert")]
    if by_name and any(s.is_file for s in specs):
        suffix = get_format(RUNTIME_FORMAT[by_name[0]]).suffix
        raise EdgeExportError(f"--runtime {by_name[0]} times models by name (exported to {suffix} through the cache); "
                              "pass model names, or time .onnx files with --runtime ort")
    if features is not None:
        if any(s.is_file for s in specs):
            raise EdgeExportError("--features times model names' backbones; an .onnx file is timed as it was "
                                  "exported (export it with --features, then pass the file without --features)")
        from ..features import select
        from ..measure import skeleton
        from ..registry import get_model_info

        for s in specs:   # every name must have the outputs asked for, before anything is timed
            select(skeleton(get_model_info(s.name).builder), features)
    todo = plan(specs, parse_res_list(res), proto.batch, "torch" if "torch" in runtimes else runtimes[0],
                features=features is not None)
    cdir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    exported = [r for r in runtimes if r != "torch"]
    if exported and any(not p.spec.is_file for p in todo):
        from ..exporters.artifacts import prepare_out_dir

        try:
            prepare_out_dir(cdir)
        except OutputError as e:
            raise OutputError(f"cache directory: {e}; pass a writable --cache-dir or set EDGEVIT_EXPORT_CACHE") from None

    optimisation = {"ort": "all (onnxruntime)", "torch": "n/a (eager PyTorch)",
                    "executorch": "XNNPACK delegate (ahead of time)",
                    "litert": "LiteRT converter + XNNPACK delegate (at load)"}
    env = collect(n_threads, graph_optimization=", ".join(optimisation[r] for r in runtimes),
                  execution_mode="sequential")
    if "torch" in runtimes:
        env.inter_op_threads = _torch_interop()
    timings: list[Timing] = []
    for p in todo:   # runtimes back to back per model × resolution: a slow spell of the VM hits them alike
        for rt in runtimes:
            common = dict(model=p.spec.name, res=p.hw, batch=proto.batch, runtime=rt, threads=n_threads)
            step = prefixed(progress, f"{p.item}{f' {rt}' if len(runtimes) > 1 else ''}: ")
            if rt == "torch":
                timings.append(_bench_torch(p, proto, common, runs, max_seconds, step, features))
            elif rt in ("executorch", "litert"):
                timings.append(_bench_runner(p, RUNTIME_FORMAT[rt], proto, common, runs, max_seconds, step, passes,
                                             cdir, features))
            else:
                timings.append(_bench_ort(p, proto, common, runs, max_seconds, step, passes, cdir, features))
    result_notes = [f"spread is {SPREAD} of the kept runs"] + [f"differs from the paper: {d}" for d in proto.differs]
    if features is not None:
        result_notes.insert(0, f"backbones (--features {features}): no pooling or classifier; MACs are the backbone's")
    return BenchResult(protocol=proto, runtime=",".join(runtimes), threads=n_threads, runs=runs or proto.runs,
                       passes=passes, env=env, timings=timings, cache_dir=str(cdir) if exported else None,
                       seconds=time.perf_counter() - t_start, max_seconds=max_seconds, notes=result_notes)


def _budget_note(m: Measurement, max_seconds: float | None) -> list[str]:
    return [f"stopped after {m.runs} timed runs: --max-seconds {max_seconds:g} reached"] if m.stopped_early else []


def _bench_ort(p: Plan, proto: Protocol, common: dict, runs, max_seconds, step: Callback | None, passes: str,
               cache_dir: Path, features: str | None = None) -> Timing:
    """The file, or the model's cached export, in onnxruntime."""
    cached = False
    if p.spec.is_file:
        path, source = p.spec.path, "file"
        manifest = sibling_manifest(path)
    else:
        emit(step, "checking the export cache")
        path, manifest, cached = cached_export(p.spec.name, p.hw, batch=proto.batch, passes=passes,
                                               cache_dir=cache_dir, progress=prefixed(step, "export: "),
                                               features=features)
        source = "export"
    if manifest and manifest.get("macs"):
        macs, macs_source = int(manifest["macs"]), "manifest"
    else:
        macs = onnx_graph_macs(path)
        macs_source = "onnx graph" if macs else ""
    inp = onnx_input(path)
    raw = bool(manifest and manifest.get("normalization", {}).get("in_graph"))
    x = make_input(inp, proto.batch, p.hw, raw_pixels=raw)
    m = time_callable(ort_runner(path, common["threads"], {inp.name: x}), proto, runs=runs, max_seconds=max_seconds,
                      progress=step)
    return timing_of(m, source=source, path=str(path), macs=macs, macs_source=macs_source, cached=cached,
                     notes=list(p.notes) + _budget_note(m, max_seconds), **common)


def _bench_runner(p: Plan, fmt: str, proto: Protocol, common: dict, runs, max_seconds, step: Callback | None,
                  passes: str, cache_dir: Path, features: str | None = None) -> Timing:
    """The model's cached export (``.pte`` or ``.tflite``) in its runtime's own Runner (the
    protocol's threads), timing the call the Runner makes with its inputs already set; a fresh
    load per round where the protocol asks for a fresh session."""
    from ..exporters import get as get_format

    backend = get_format(fmt).backend()
    emit(step, "checking the export cache")
    path, manifest, cached = cached_export(p.spec.name, p.hw, batch=proto.batch, passes=passes, cache_dir=cache_dir,
                                           progress=prefixed(step, "export: "), format=fmt, features=features)
    spec = backend.load(path, common["threads"]).inputs[0]
    feeds = {spec["name"]: np.random.default_rng(0).standard_normal(spec["shape"]).astype(np.float32)}

    def make():
        return backend.load(path, common["threads"]).prepared(feeds)

    m = time_callable(make, proto, runs=runs, max_seconds=max_seconds, progress=step)
    notes = list(p.notes) + _budget_note(m, max_seconds)
    structure = backend.structure(backend.describe(path), {})
    notes.append(structure["summary"])
    return timing_of(m, source="export", path=str(path), macs=int(manifest["macs"]) if manifest.get("macs") else None,
                     macs_source="manifest" if manifest.get("macs") else "", cached=cached, notes=notes, **common)


def _bench_torch(p: Plan, proto: Protocol, common: dict, runs, max_seconds, step: Callback | None,
                 features: str | None = None) -> Timing:
    """The eager PyTorch model (or its backbone), by name (no export, no cache)."""
    import torch

    from ..api import prepare_model
    from ..features import Backbone, select
    from ..measure import count_macs

    emit(step, "building the PyTorch model")
    _info, hw, model, _random = prepare_model(p.spec.name, p.hw, None, None, features=features is not None)
    if features is not None:
        model = Backbone(model, select(model, features))
    macs = count_macs(model, hw, proto.batch)
    x = torch.randn(proto.batch, 3, *hw, generator=torch.Generator().manual_seed(0))
    m = time_torch(model, x, proto, threads=common["threads"], runs=runs, max_seconds=max_seconds, progress=step)
    notes = ["eager PyTorch, inference_mode"]
    if proto.fresh_session_per_round:
        notes.append("the same module is re-used each round (nothing to reload in eager PyTorch)")
    return timing_of(m, source="pytorch", path=None, macs=macs, macs_source="pytorch",
                     notes=notes + _budget_note(m, max_seconds), **common)


def _torch_interop() -> int:
    import torch

    return torch.get_num_interop_threads()
