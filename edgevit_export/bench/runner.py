"""The timing runner: export (cached) → time under a protocol → dataclasses. Never prints.

What is timed is what users ship: a model name is exported through ``edgevit_export.api.export``
into a cache directory keyed by model, resolution, batch, passes and toolkit version, and that
very file is loaded into an onnxruntime session built like ``exporters.onnx.ort_session``
(sequential, CPU, all graph optimisations, the protocol's intra-op threads). ``--runtime torch``
times the eager PyTorch model the same way. Progress goes through an optional callback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EdgeExportError, OutputError, first_line
from .env import Environment, collect
from .protocols import MEDIAN, Protocol, get_protocol

RUNTIMES = ("ort", "torch")
SPREAD = "p90 − p10"  # what "spread" means everywhere in bench output


# ── progress ─────────────────────────────────────────────────────────────────────────────────


@dataclass
class Progress:
    """One progress report: ``item`` is "model@res", ``phase`` export | load | warmup | time | done."""

    item: str
    phase: str
    done: int = 0
    total: int = 0
    message: str = ""


ProgressFn = Callable[[Progress], None]


def _noop(_p: Progress) -> None:
    pass


# ── what to time ─────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ModelSpec:
    """A registered model name, or a path to an exported ``.onnx`` file."""

    name: str
    path: Path | None = None

    @property
    def is_file(self) -> bool:
        return self.path is not None


def _looks_like_path(s: str) -> bool:
    return s.lower().endswith(".onnx") or os.sep in s or "/" in s or Path(s).expanduser().is_file()


def parse_models(spec: str | list[str]) -> list[ModelSpec]:
    """``"shvit_s1,litv2_s"`` | ``"all"`` | paths to ``.onnx`` files (mixed freely) → specs, checked."""
    from ..registry import get_model_info, list_models

    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise EdgeExportError("no models given; pass names (e.g. shvit_s1,litv2_s), 'all', or .onnx files")
    out: list[ModelSpec] = []
    for s in items:
        if s == "all":
            out += [ModelSpec(n) for n in list_models()]
        elif _looks_like_path(s):
            p = Path(s).expanduser()
            onnx_input(p)  # raises a one-line error if it is not a loadable ONNX model
            out.append(ModelSpec(p.stem, p))
        else:
            get_model_info(s)  # UnknownModelError with suggestions
            out.append(ModelSpec(s))
    seen, unique = set(), []
    for m in out:
        key = (m.name, m.path)
        if key not in seen:
            seen.add(key)
            unique.append(m)
    return unique


@dataclass
class OnnxInput:
    name: str
    shape: list[int | None]   # None where the dimension is symbolic
    dtype: str                # numpy dtype name


_ONNX_DTYPES = {1: "float32", 10: "float16", 11: "float64", 2: "uint8", 3: "int8", 6: "int32", 7: "int64"}


def onnx_input(path: Path) -> OnnxInput:
    """The single image input of an ONNX file, or a one-line error saying what is wrong."""
    import onnx

    if not path.exists():
        raise EdgeExportError(f"{path}: no such file; pass a model name or the path of an exported .onnx file")
    if path.is_dir():
        raise EdgeExportError(f"{path} is a directory, not an ONNX model; pass a .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise EdgeExportError(f"{path} is not an ONNX model (cannot parse it); pass a file written by "
                              "'edgevit-export export' or another ONNX exporter") from None
    if not model.graph.node:
        raise EdgeExportError(f"{path} is not an ONNX model (it has no graph nodes); pass an exported .onnx file")
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise EdgeExportError(f"{path} has {len(inputs)} inputs; bench times image models with one input")
    i = inputs[0]
    tt = i.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    if len(dims) != 4:
        raise EdgeExportError(f"{path}: input '{i.name}' has rank {len(dims)}; bench expects N×3×H×W images")
    return OnnxInput(i.name, dims, _ONNX_DTYPES.get(tt.elem_type, "float32"))


def onnx_graph_macs(path: Path) -> int | None:
    """Multiply-accumulates of Conv / ConvTranspose / MatMul / Gemm, from the graph's shapes."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    except Exception:
        return None
    shapes: dict[str, list[int]] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[vi.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for n in model.graph.node:
        try:
            if n.op_type == "Conv":
                w, y = shapes[n.input[1]], shapes[n.output[0]]
                total += math.prod(y) * math.prod(w[1:])
            elif n.op_type == "ConvTranspose":
                x, w = shapes[n.input[0]], shapes[n.input[1]]
                total += math.prod(x) * math.prod(w[1:])
            elif n.op_type == "MatMul":
                a, y = shapes[n.input[0]], shapes[n.output[0]]
                total += math.prod(y) * a[-1]
            elif n.op_type == "Gemm":
                a, y = shapes[n.input[0]], shapes[n.output[0]]
                trans_a = any(at.name == "transA" and at.i for at in n.attribute)
                total += math.prod(y) * (a[0] if trans_a else a[-1])
        except (KeyError, IndexError):
            continue
    return total or None


# ── the export cache ─────────────────────────────────────────────────────────────────────────


def default_cache_dir() -> Path:
    """``$EDGEVIT_EXPORT_CACHE/bench``, else ``$XDG_CACHE_HOME/edgevit-export/bench``
    (``~/.cache/edgevit-export/bench``)."""
    root = os.environ.get("EDGEVIT_EXPORT_CACHE")
    if root:
        return Path(root).expanduser() / "bench"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "edgevit-export" / "bench"


def _passes_tag(passes: str) -> str:
    tag = passes.replace(",", "+").replace(" ", "")
    if len(tag) > 60:
        tag = hashlib.sha256(tag.encode()).hexdigest()[:12]
    return tag


def cache_path(cache_dir: Path, name: str, hw: tuple[int, int], batch: int, passes: str) -> Path:
    from .. import __version__
    from ..exporters.artifacts import res_tag

    return cache_dir / name / f"{name}-{res_tag(hw)}-b{batch}-{_passes_tag(passes)}-v{__version__}.onnx"


def cached_export(name: str, hw: tuple[int, int], *, batch: int, passes: str, cache_dir: Path,
                  progress: Callable[[str], None] | None = None) -> tuple[Path, dict, bool]:
    """The exported file for (model, res, batch, passes, version): re-used when its manifest's
    sha256 matches, otherwise exported through ``api.export``. Returns (path, manifest, reused)."""
    from .. import api
    from ..exporters.artifacts import sha256

    path = cache_path(cache_dir, name, hw, batch, passes)
    manifest_path = path.with_suffix(".json")
    if path.is_file() and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("sha256") == sha256(path):
                return path, manifest, True
        except (OSError, ValueError):
            pass
    r = api.export(name, format="onnx", res=hw, output=path, check=False, force=True, batch=batch,
                   passes=passes, progress=progress)
    return r.artifact, r.manifest, False


# ── timing ───────────────────────────────────────────────────────────────────────────────────


@dataclass
class Measurement:
    """Timed runs under a protocol. All figures in milliseconds per run (one run = one batch)."""

    samples_ms: list[float]          # the runs kept (after per-round discards and trims), in run order
    round_means_ms: list[float]      # one per round (one round unless the protocol has rounds)
    runs: int                        # kept runs
    runs_total: int                  # runs executed, warm-up and discarded ones included
    warmup_runs: int
    rounds: int
    seconds: float
    statistic: str
    stopped_early: bool = False

    @property
    def headline_ms(self) -> float:
        if self.statistic == MEDIAN:
            return self.median_ms
        return float(np.mean(self.round_means_ms))

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))


class _Budget:
    def __init__(self, max_seconds: float | None):
        self.deadline = None if not max_seconds else time.perf_counter() + max_seconds

    def over(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


def time_callable(make_run: Callable[[], Callable[[], object]], protocol: Protocol, *, runs: int | None = None,
                  max_seconds: float | None = None, min_runs: int = 10, item: str = "",
                  progress: ProgressFn | None = None) -> Measurement:
    """Time ``make_run()()`` under ``protocol``. ``make_run`` builds whatever must be fresh per
    round (an onnxruntime session) and returns the zero-argument function timed for one run.

    ``max_seconds`` caps the timed phase: timing stops once at least ``min_runs`` runs (one round
    for round protocols) are in and the budget is spent; the result says so (``stopped_early``).
    """
    report = progress or _noop
    runs = protocol.runs if runs is None else runs
    if runs < 1:
        raise EdgeExportError(f"--runs must be at least 1, got {runs}")
    rounds = protocol.rounds
    trim = protocol.trim(runs)
    total = protocol.warmup_runs + rounds * (protocol.discard_first + runs)
    done = 0
    last_report = 0.0

    def tick(phase: str, force: bool = False):
        nonlocal last_report
        now = time.perf_counter()
        if force or now - last_report > 0.1:
            last_report = now
            report(Progress(item, phase, done, total))

    t_start = time.perf_counter()
    run = None
    warm = 0
    if protocol.warmup_runs and not protocol.fresh_session_per_round:
        report(Progress(item, "load", 0, total))
        run = make_run()
        t_w = time.perf_counter()
        while warm < protocol.warmup_runs:
            run()
            warm += 1
            done += 1
            tick("warmup")
            if warm >= min(2, protocol.warmup_runs) and time.perf_counter() - t_w > protocol.warmup_seconds:
                break
        total -= protocol.warmup_runs - warm

    budget = _Budget(max_seconds)
    kept: list[float] = []
    round_means: list[float] = []
    stopped = False
    perf = time.perf_counter_ns
    for r in range(rounds):
        if protocol.fresh_session_per_round or run is None:
            report(Progress(item, "load", done, total))
            run = make_run()
        for _ in range(protocol.discard_first):
            run()
            done += 1
        samples = []
        for i in range(runs):
            t0 = perf()
            run()
            samples.append((perf() - t0) / 1e6)
            done += 1
            tick("time")
            if rounds == 1 and len(samples) >= min_runs and budget.over():
                stopped = i + 1 < runs
                break
        if trim and len(samples) > 2 * trim:  # drop the fastest and slowest; keep run order
            order = sorted(range(len(samples)), key=samples.__getitem__)
            drop = set(order[:trim]) | set(order[len(samples) - trim:])
            cut = [v for i, v in enumerate(samples) if i not in drop]
        else:
            cut = samples
        kept += cut
        round_means.append(float(np.mean(cut)))
        if rounds > 1 and budget.over() and r + 1 < rounds:
            stopped = True
            break
    tick("done", force=True)
    return Measurement(samples_ms=kept, round_means_ms=round_means, runs=len(kept), runs_total=done,
                       warmup_runs=warm + protocol.discard_first * len(round_means), rounds=len(round_means),
                       seconds=time.perf_counter() - t_start, statistic=protocol.statistic, stopped_early=stopped)


def make_input(inp: OnnxInput, batch: int, hw: tuple[int, int] | None, raw_pixels: bool = False) -> np.ndarray:
    """A seeded input of the file's shape; symbolic batch/H/W take ``batch`` and ``hw``."""
    n, c, h, w = inp.shape
    if (h is None or w is None) and hw is None:
        raise EdgeExportError(f"input '{inp.name}' has a symbolic height/width; pass --res")
    shape = (n or batch, c or 3, h or hw[0], w or hw[1])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, shape) if raw_pixels else rng.standard_normal(shape)
    return x.astype(inp.dtype)


def ort_runner(path: Path, threads: int, feed: dict[str, np.ndarray]) -> Callable[[], Callable[[], object]]:
    """A ``make_run`` for :func:`time_callable`: a fresh session (``exporters.onnx.ort_session``
    settings) each call, returning its ``run`` bound to ``feed``."""
    from ..exporters.onnx import ort_session

    def make():
        try:
            sess = ort_session(Path(path), threads=threads, optimize=True)
        except Exception as e:
            first = first_line(e)
            raise EdgeExportError(f"onnxruntime cannot load {path}: {first[:300]}") from None
        return lambda: sess.run(None, feed)

    return make


def time_onnx(path: Path, protocol: Protocol | str, *, threads: int | None = None, runs: int | None = None,
              hw: tuple[int, int] | None = None, batch: int | None = None, max_seconds: float | None = None,
              item: str = "", progress: ProgressFn | None = None) -> Measurement:
    """Time one ONNX file under ``protocol`` (thread count and run count overridable)."""
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    inp = onnx_input(Path(path))
    x = make_input(inp, batch or protocol.batch, hw)
    make = ort_runner(Path(path), threads or protocol.threads, {inp.name: x})
    return time_callable(make, protocol, runs=runs, max_seconds=max_seconds, item=item, progress=progress)


def time_torch(model, x, protocol: Protocol, *, threads: int, runs: int | None = None,
               max_seconds: float | None = None, item: str = "", progress: ProgressFn | None = None) -> Measurement:
    """Time the eager PyTorch model (inference mode, ``threads`` intra-op threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def make():
            def run():
                with torch.inference_mode():
                    return model(x)
            return run

        return time_callable(make, protocol, runs=runs, max_seconds=max_seconds, item=item, progress=progress)
    finally:
        torch.set_num_threads(before)


# ── results ──────────────────────────────────────────────────────────────────────────────────


@dataclass
class Timing:
    """One model at one resolution under one protocol."""

    model: str
    res: tuple[int, int]
    batch: int
    runtime: str
    threads: int
    source: str                    # "export" (model name, via the cache) | "file" | "pytorch"
    path: str | None
    headline_ms: float             # the protocol's statistic (median, or mean of trimmed round means)
    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    runs: int
    runs_total: int
    rounds: int
    warmup_runs: int
    seconds: float
    macs: int | None               # for the whole batch
    macs_source: str               # "manifest" | "onnx graph" | "pytorch" | ""
    stopped_early: bool = False
    cached: bool = False
    round_means_ms: list[float] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def spread_ms(self) -> float:
        return self.p90_ms - self.p10_ms

    @property
    def macs_per_image(self) -> float | None:
        return None if self.macs is None else self.macs / self.batch

    @property
    def gflops(self) -> float | None:
        """Achieved GFLOP/s: 2 × MACs / time (2 FLOPs per multiply-accumulate)."""
        return None if not self.macs else 2 * self.macs / (self.headline_ms / 1e3) / 1e9

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.headline_ms / 1e3)

    def as_dict(self, samples: bool = True) -> dict:
        d = asdict(self)
        d["res"] = list(self.res)
        d.update(spread_ms=self.spread_ms, spread=SPREAD, gflops=self.gflops, images_per_s=self.images_per_s,
                 macs_per_image=self.macs_per_image)
        if not samples:
            d.pop("samples_ms")
            d.pop("round_means_ms")
        return d


def _timing(m: Measurement, **kw) -> Timing:
    s = m.samples_ms
    return Timing(headline_ms=m.headline_ms, median_ms=m.median_ms, mean_ms=float(np.mean(s)),
                  p10_ms=m.percentile(10), p90_ms=m.percentile(90), q1_ms=m.percentile(25), q3_ms=m.percentile(75),
                  min_ms=float(np.min(s)), max_ms=float(np.max(s)), runs=m.runs, runs_total=m.runs_total,
                  rounds=m.rounds, warmup_runs=m.warmup_runs, seconds=m.seconds, stopped_early=m.stopped_early,
                  round_means_ms=[round(v, 5) for v in m.round_means_ms],
                  samples_ms=[round(v, 5) for v in s], **kw)


@dataclass
class BenchResult:
    protocol: Protocol
    runtime: str
    threads: int
    runs: int
    passes: str
    env: Environment
    timings: list[Timing]
    cache_dir: str | None
    seconds: float
    spread: str = SPREAD
    max_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self, samples: bool = True) -> dict:
        return {"protocol": self.protocol.as_dict(), "runtime": self.runtime, "threads": self.threads,
                "runs": self.runs, "passes": self.passes, "spread": self.spread, "max_seconds": self.max_seconds,
                "cache_dir": self.cache_dir, "seconds": round(self.seconds, 3), "environment": self.env.as_dict(),
                "notes": self.notes, "results": [t.as_dict(samples) for t in self.timings]}


def parse_res_list(res: str | int | list | None) -> list[str | None]:
    if res is None:
        return [None]
    if isinstance(res, int):
        return [str(res)]
    items = [s.strip() for s in res.split(",")] if isinstance(res, str) else [str(s) for s in res]
    items = [s for s in items if s]
    return items or [None]


@dataclass
class _Plan:
    spec: ModelSpec
    hw: tuple[int, int]
    item: str
    notes: list[str] = field(default_factory=list)


def plan(models: list[ModelSpec], res: list[str | None], batch: int, runtime: str) -> list[_Plan]:
    """Every (model, resolution) to time, checked before anything is exported or timed."""
    from ..exporters.artifacts import res_tag
    from ..registry import get_model_info, parse_resolution

    out = []
    for m in models:
        if m.is_file:
            if runtime == "torch":
                raise EdgeExportError(f"--runtime torch times models by name; {m.path} is an ONNX file "
                                      "(use --runtime ort, or pass the model name)")
            inp = onnx_input(m.path)
            n, _c, h, w = inp.shape
            if n is not None and n != batch:
                raise EdgeExportError(f"{m.path} was exported with batch {n} but the protocol runs batch {batch}; "
                                      f"export it with --batch {batch} or pass the model name")
            notes = []
            if h is not None and w is not None:
                hws = [(h, w)]  # a static file has one resolution, whatever --res says
                if any(r is not None for r in res):
                    notes.append(f"static file: timed at its own {res_tag((h, w))}, --res does not apply")
            else:
                hws = []
                for r in res:
                    if r is None:
                        raise EdgeExportError(f"{m.path} has a symbolic height/width; pass --res")
                    parts = [int(p) for p in r.lower().split("x")] if r.replace("x", "").isdigit() else []
                    if len(parts) not in (1, 2):
                        raise EdgeExportError(f"resolution '{r}': use N or HxW, e.g. 1024 or 768x1024")
                    hws.append((parts[0], parts[-1]))
            out += [_Plan(m, hw, f"{m.path.name}@{res_tag(hw)}", notes) for hw in hws]
        else:
            info = get_model_info(m.name)
            for r in res:
                hw = parse_resolution(r, info)
                out.append(_Plan(m, hw, f"{m.name}@{res_tag(hw)}"))
    seen, unique = set(), []
    for p in out:
        if (p.spec, p.hw) not in seen:
            seen.add((p.spec, p.hw))
            unique.append(p)
    return unique


def run_bench(models: str | list[str], res: str | int | list | None = None, *, protocol: str = "iphone12",
              runtime: str = "ort", threads: int | None = None, runs: int | None = None, passes: str = "default",
              cache_dir: str | Path | None = None, max_seconds: float | None = None,
              progress: ProgressFn | None = None) -> BenchResult:
    """Time every model × resolution under ``protocol``; returns a :class:`BenchResult`.

    Everything the user typed is checked first (protocol, runtime, counts, names, files,
    resolutions, passes); a mistake raises ``EdgeExportError`` before any export or timing.
    """
    from ..passes import resolve_passes

    t_start = time.perf_counter()
    report = progress or _noop
    proto = get_protocol(protocol)
    if runtime not in RUNTIMES:
        raise EdgeExportError(f"unknown runtime '{runtime}'; use one of: {', '.join(RUNTIMES)}")
    if runs is not None and runs < 1:
        raise EdgeExportError(f"--runs must be at least 1, got {runs}")
    if threads is not None and threads < 1:
        raise EdgeExportError(f"--threads must be at least 1, got {threads}")
    if max_seconds is not None and max_seconds <= 0:
        raise EdgeExportError(f"--max-seconds must be positive, got {max_seconds:g}")
    resolve_passes(passes, "onnx")
    n_threads = threads or proto.threads
    specs = parse_models(models)
    todo = plan(specs, parse_res_list(res), proto.batch, runtime)
    cdir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if runtime == "ort" and any(not p.spec.is_file for p in todo):
        from ..exporters.artifacts import prepare_out_dir

        try:
            prepare_out_dir(cdir)
        except OutputError as e:
            raise OutputError(f"cache directory: {e}; pass a writable --cache-dir or set EDGEVIT_EXPORT_CACHE") from None

    env = collect(n_threads, graph_optimization="all" if runtime == "ort" else "n/a (eager PyTorch)",
                  execution_mode="sequential")
    if runtime == "torch":
        env.inter_op_threads = _torch_interop()
    timings: list[Timing] = []
    for p in todo:
        common = dict(model=p.spec.name, res=p.hw, batch=proto.batch, runtime=runtime, threads=n_threads)
        if runtime == "torch":
            timings.append(_bench_torch(p, proto, common, runs, max_seconds, report))
            continue
        notes: list[str] = list(p.notes)
        cached = False
        manifest: dict | None = None
        if p.spec.is_file:
            path, source = p.spec.path, "file"
            manifest = _sibling_manifest(path)
        else:
            report(Progress(p.item, "export", message="checking the export cache"))
            path, manifest, cached = cached_export(
                p.spec.name, p.hw, batch=proto.batch, passes=passes, cache_dir=cdir,
                progress=lambda s, item=p.item: report(Progress(item, "export", message=s)))
            source = "export"
        macs, macs_source = None, ""
        if manifest and manifest.get("macs"):
            macs, macs_source = int(manifest["macs"]), "manifest"
        else:
            macs = onnx_graph_macs(path)
            macs_source = "onnx graph" if macs else ""
        inp = onnx_input(path)
        raw = bool(manifest and manifest.get("normalization", {}).get("in_graph"))
        x = make_input(inp, proto.batch, p.hw, raw_pixels=raw)
        m = time_callable(ort_runner(path, n_threads, {inp.name: x}), proto, runs=runs, max_seconds=max_seconds,
                          item=p.item, progress=report)
        if m.stopped_early:
            notes.append(f"stopped after {m.runs} timed runs: --max-seconds {max_seconds:g} reached")
        timings.append(_timing(m, source=source, path=str(path), macs=macs, macs_source=macs_source,
                               cached=cached, notes=notes, **common))
    result_notes = [f"spread is {SPREAD} of the kept runs"] + [f"differs from the paper: {d}" for d in proto.differs]
    return BenchResult(protocol=proto, runtime=runtime, threads=n_threads, runs=runs or proto.runs, passes=passes,
                       env=env, timings=timings, cache_dir=str(cdir) if runtime == "ort" else None,
                       seconds=time.perf_counter() - t_start, max_seconds=max_seconds, notes=result_notes)


def _torch_interop() -> int:
    import torch

    return torch.get_num_interop_threads()


def _sibling_manifest(path: Path) -> dict | None:
    """The manifest 'edgevit-export export' writes beside a file, if it belongs to this very file."""
    from ..exporters.artifacts import sha256

    mp = path.with_suffix(".json")
    try:
        manifest = json.loads(mp.read_text())
        if manifest.get("sha256") == sha256(path):
            return manifest
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _bench_torch(p: _Plan, proto: Protocol, common: dict, runs, max_seconds, report) -> Timing:
    import torch

    from ..api import prepare_model
    from ..measure import count_macs

    report(Progress(p.item, "load", message="building the PyTorch model"))
    _info, hw, model, _random = prepare_model(p.spec.name, p.hw, None, None)
    macs = count_macs(model, hw, proto.batch)
    x = torch.randn(proto.batch, 3, *hw, generator=torch.Generator().manual_seed(0))
    m = time_torch(model, x, proto, threads=common["threads"], runs=runs, max_seconds=max_seconds, item=p.item,
                   progress=report)
    notes = ["eager PyTorch, inference_mode"]
    if proto.fresh_session_per_round:
        notes.append("the same module is re-used each round (nothing to reload in eager PyTorch)")
    if m.stopped_early:
        notes.append(f"stopped after {m.runs} timed runs: --max-seconds {max_seconds:g} reached")
    return _timing(m, source="pytorch", path=None, macs=macs, macs_source="pytorch", notes=notes, **common)


# ── the machine's matrix-multiply peak in onnxruntime ────────────────────────────────────────


@dataclass
class MatmulPeak:
    threads: int
    sizes: list[int]
    gflops: list[float]            # median-run GFLOP/s per size (n×n @ n×n)
    median_ms: list[float]
    p10_gflops: list[float] = field(default_factory=list)  # at the fastest decile's time (less hurt by a busy machine)

    @property
    def peak_gflops(self) -> float:
        return max(self.gflops)

    @property
    def best_size(self) -> int:
        return self.sizes[self.gflops.index(self.peak_gflops)]


def matmul_model(n: int) -> bytes:
    """A one-node ONNX model: Y = X @ W with X an n×n input and W an n×n constant."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "matmul_peak",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])],
        initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def measure_matmul_peak(threads: int = 2, sizes: tuple[int, ...] = (256, 512, 1024, 2048), *,
                        seconds_per_size: float = 2.0, min_runs: int = 5) -> MatmulPeak:
    """Achievable fp32 GFLOP/s of onnxruntime's MatMul on this machine with ``threads`` threads:
    the median run at each size, and the best size's figure as the peak."""
    from ..exporters.onnx import ort_session

    gfl, med, fast = [], [], []
    for n in sizes:
        sess = ort_session(matmul_model(n), threads=threads)
        x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        for _ in range(3):
            sess.run(None, {"X": x})
        ts = []
        t_end = time.perf_counter() + seconds_per_size
        while len(ts) < min_runs or time.perf_counter() < t_end:
            t0 = time.perf_counter_ns()
            sess.run(None, {"X": x})
            ts.append((time.perf_counter_ns() - t0) / 1e6)
            if len(ts) >= 2000:
                break
        m = float(np.median(ts))
        med.append(m)
        gfl.append(2 * n ** 3 / (m / 1e3) / 1e9)
        fast.append(2 * n ** 3 / (float(np.percentile(ts, 10)) / 1e3) / 1e9)
    return MatmulPeak(threads, list(sizes), gfl, med, fast)
