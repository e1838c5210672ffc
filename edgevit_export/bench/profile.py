"""onnxruntime's profiler, aggregated per op type and per node: where the time goes, and how much
of it is memory-bound (reshape, transpose, concat, split, slice, normalisation, softmax,
elementwise) rather than compute-bound (conv, matmul, gemm) — the SHViT paper's argument, measured.

Op types are onnxruntime's *after* its graph optimisations (what actually ran: fused convs,
NCHWc layout reorders, fused GELU/LayerNorm …), so the split describes the executed program.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgeExportError
from ..ort import user_session
from ..progress import Callback, emit, prefixed
from .cache import cached_export, default_cache_dir
from .onnx_facts import onnx_input
from .plan import ModelSpec, parse_models, plan
from .timing import make_input

COMPUTE = "compute-bound"
MEMORY = "memory-bound"
OTHER = "other"

# op type → (class, group). Groups of memory-bound ops follow the SHViT paper's list.
_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "conv / matmul / gemm": (COMPUTE, (
        "Conv", "ConvTranspose", "FusedConv", "NhwcConv", "NhwcFusedConv", "QLinearConv", "ConvInteger",
        "MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
        "MatMulNBits", "Gemm", "FusedGemm", "QGemm", "Einsum", "Attention", "MultiHeadAttention")),
    "reshape / layout / copy": (MEMORY, (
        "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "Squeeze",
        "Unsqueeze", "Flatten", "Expand", "Pad", "Tile", "Identity", "Cast", "ReorderInput", "ReorderOutput",
        "DepthToSpace", "SpaceToDepth", "Shape", "Resize", "Upsample", "GridSample", "ScatterND", "ScatterElements",
        "Range", "ConstantOfShape", "Trilu", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")),
    "normalisation": (MEMORY, (
        "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization", "GroupNormalization", "GroupNorm", "InstanceNormalization",
        "BatchNormalization", "LpNormalization", "MeanVarianceNormalization")),
    "softmax": (MEMORY, ("Softmax", "LogSoftmax")),
    "elementwise / activation": (MEMORY, (
        "Add", "Sub", "Mul", "Div", "Relu", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Erf", "Sqrt", "Pow", "Exp", "Log", "Neg", "Abs", "Tanh", "Clip", "Max", "Min", "Where",
        "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "LeakyRelu", "Elu",
        "Softplus", "Mish", "Reciprocal", "Floor", "Ceil", "Round", "Sum", "Mean", "BiasAdd", "Sin", "Cos",
        "PRelu", "Selu", "Celu", "Softsign", "ThresholdedRelu", "Sign", "Mod", "IsNaN", "Xor", "BitShift")),
    "pooling / reduction": (MEMORY, (
        "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "LpPool", "ReduceMean", "ReduceSum",
        "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
        "ReduceSumSquare", "ArgMax", "ArgMin", "TopK")),
}
OP_CLASS: dict[str, tuple[str, str]] = {op: (cls, g) for g, (cls, ops) in _GROUPS.items() for op in ops}
GROUP_ORDER = list(_GROUPS) + ["other"]


def classify(op_type: str) -> tuple[str, str]:
    """(class, group) of an onnxruntime op type; unknown ops are 'other', never guessed."""
    return OP_CLASS.get(op_type, (OTHER, "other"))


@dataclass
class OpStat:
    op_type: str
    cls: str
    group: str
    nodes: int          # nodes of this type executed per run
    ms: float           # per run: sum over its nodes of each node's median
    share: float        # of all kernel time


@dataclass
class NodeStat:
    name: str
    op_type: str
    cls: str
    ms: float
    share: float
    output_shape: list[int] | None = None
    depthwise: bool = False
    module: str = ""           # the model's module it came from (ONNX files we wrote), '' if unknown
    fused: str = ""            # op types onnxruntime fused into this node (e.g. Relu into a Conv)


@dataclass
class Profile:
    model: str
    res: tuple[int, int]
    passes: str
    threads: int
    runs: int
    path: str
    run_ms: float              # median wall time of one profiled run (profiling adds a little overhead)
    kernel_ms: float           # per run: sum over nodes of each node's median kernel time
    compute_ms: float
    memory_ms: float
    other_ms: float
    depthwise_ms: float        # compute-bound by op type, but of low arithmetic intensity
    groups_ms: dict[str, float]
    ops: list[OpStat]
    nodes: list[NodeStat]      # all nodes, slowest first
    node_count: int
    notes: list[str] = field(default_factory=list)
    runtime: str = "ort"

    def share(self, ms: float) -> float:
        return ms / self.kernel_ms if self.kernel_ms else 0.0

    @property
    def compute_share(self) -> float:
        return self.share(self.compute_ms)

    @property
    def memory_share(self) -> float:
        return self.share(self.memory_ms)

    def as_dict(self, top: int | None = None) -> dict:
        d = asdict(self)
        d["res"] = list(self.res)
        d["compute_share"], d["memory_share"] = self.compute_share, self.memory_share
        if top is not None:
            d["nodes"] = d["nodes"][:top]
        return d


def _depthwise(args: dict) -> bool:
    """A conv whose weight is C×1×k×k with as many output channels as input channels."""
    try:
        shapes = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
        x, w = shapes[0], shapes[1]
        return len(w) == 4 and w[1] == 1 and w[0] == x[1] and x[1] > 1
    except (StopIteration, IndexError, TypeError, AttributeError, KeyError):
        return False


def aggregate(events: list[dict], runs: int) -> tuple[list[OpStat], list[NodeStat], float, list[float]]:
    """Node events of the last ``runs`` runs → per node, the median time per run over those runs;
    per op type, the sum over its nodes. Returns (ops, nodes, kernel ms per run, wall ms of each run)."""
    run_events = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in run_events[-runs:]]
    if not windows:
        raise EdgeExportError("onnxruntime's profile holds no runs; try more --runs")
    lo = windows[0][0]

    def run_of(ts: int) -> int:
        for i, (a, b) in enumerate(windows):
            if a <= ts <= b:
                return i
        return -1

    per_node: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < lo:
            continue
        r = run_of(e["ts"])
        if r < 0:
            continue
        args = e.get("args", {})
        name = e["name"][: -len("_kernel_time")]
        d = per_node.setdefault(name, {"op": args.get("op_name", "?"), "us": [0] * len(windows), "shape": None,
                                       "dw": False})
        d["us"][r] += e["dur"]
        if d["shape"] is None:
            try:
                d["shape"] = next(iter(args["output_type_shape"][0].values()))
            except (KeyError, IndexError, StopIteration, AttributeError):
                pass
            d["dw"] = d["op"] in ("Conv", "FusedConv", "NhwcConv", "NhwcFusedConv") and _depthwise(args)
    # Per node, the median over runs: a kernel pre-empted by another process in one run does not
    # inflate its op type (shared machines are noisy).
    node_ms = {name: float(np.median(d["us"])) / 1e3 for name, d in per_node.items()}
    total_ms = sum(node_ms.values())
    nodes = []
    ops: dict[str, list] = {}
    for name, d in per_node.items():
        ms = node_ms[name]
        cls, group = classify(d["op"])
        nodes.append(NodeStat(name, d["op"], cls, ms, ms / total_ms if total_ms else 0.0, d["shape"], d["dw"]))
        o = ops.setdefault(d["op"], [cls, group, 0, 0.0])
        o[2] += 1
        o[3] += ms
    nodes.sort(key=lambda n: -n.ms)
    op_stats = sorted((OpStat(op, cls, g, n, ms, ms / total_ms if total_ms else 0.0)
                       for op, (cls, g, n, ms) in ops.items()), key=lambda o: -o.ms)
    return op_stats, nodes, total_ms, [(b - a) / 1e3 for a, b in windows]


_ORT_SUFFIX = re.compile(r"(_nchwc|_token_\d+|_output_\d+|_fused|_reorder_\w+)$")
_SAME_KERNEL = {"FusedConv": "Conv", "NhwcConv": "Conv", "NhwcFusedConv": "Conv", "FusedMatMul": "MatMul",
                "FusedGemm": "Gemm"}


def name_modules(nodes: list[NodeStat], path: Path) -> None:
    """Fill each node's ``module`` from the file's node metadata. onnxruntime names the nodes its
    optimisations create after an output or node of the file (``relu_6_nchwc``: the NCHWc Conv
    that now computes ``relu_6``); where that output's node is of another op type (the Relu fused
    into the Conv), the module is the one of the producer of that kind, and ``fused`` says so."""
    from ..exporters.onnx import node_modules

    try:
        table = node_modules(path)
    except Exception:  # a file of someone else's or without metadata: names stay onnxruntime's
        return
    for n in nodes:
        keys = [n.name]
        while (shorter := _ORT_SUFFIX.sub("", keys[-1], count=1)) != keys[-1]:
            keys.append(shorter)
        keys += [f"node_{k}" for k in keys]
        hit = next((table[k] for k in keys if k in table), None)
        if hit is None:
            continue
        want = _SAME_KERNEL.get(n.op_type, n.op_type)
        module, op, inputs = hit
        fused = []
        for _ in range(3):      # walk back through fused activations to the kernel's own node
            if op == want or not inputs or inputs[0] not in table:
                break
            fused.append(op)
            module, op, inputs = table[inputs[0]]
        if op != want:
            module, fused = hit[0], []
        n.module, n.fused = module, "+".join(reversed(fused))


def profile_onnx(path: Path, *, model: str | None = None, res: tuple[int, int] | None = None, passes: str = "",
                 threads: int = 2, runs: int = 50, warmup: int = 5, progress: Callback | None = None) -> Profile:
    """Profile one ONNX file: ``warmup`` runs, then ``runs`` profiled runs that are aggregated."""
    if runs < 1:
        raise EdgeExportError(f"--runs must be at least 1, got {runs}")
    inp = onnx_input(Path(path))
    x = make_input(inp, inp.shape[0] or 1, res)
    with tempfile.TemporaryDirectory(prefix="edgevit-profile-") as tmp:
        sess = user_session(Path(path), threads=threads, profile_prefix=os.path.join(tmp, "ort"))
        total = warmup + runs
        last = 0.0
        for i in range(total):
            sess.run(None, {inp.name: x})
            if time.perf_counter() - last > 0.1 or i + 1 == total:
                last = time.perf_counter()
                emit(progress, "profile (warm-up included)", i + 1, total)
        prof = sess.end_profiling()
        with open(prof, encoding="utf-8") as f:
            events = json.load(f)
    ops, nodes, kernel_ms, walls = aggregate(events, runs)
    name_modules(nodes, Path(path))
    by = {"compute": 0.0, "memory": 0.0, "other": 0.0}
    groups = {g: 0.0 for g in GROUP_ORDER}
    for o in ops:
        by["compute" if o.cls == COMPUTE else "memory" if o.cls == MEMORY else "other"] += o.ms
        groups[o.group] += o.ms
    dw = sum(n.ms for n in nodes if n.depthwise)
    notes = []
    unknown = sorted({o.op_type for o in ops if o.cls == OTHER})
    if unknown:
        notes.append(f"not classified (counted as other): {', '.join(unknown)}")
    h, w = inp.shape[2] or (res or (0, 0))[0], inp.shape[3] or (res or (0, 0))[1]
    return Profile(model=model or Path(path).stem, res=(h, w), passes=passes, threads=threads, runs=len(walls),
                   path=str(path), run_ms=float(np.median(walls)), kernel_ms=kernel_ms, compute_ms=by["compute"],
                   memory_ms=by["memory"], other_ms=by["other"], depthwise_ms=dw,
                   groups_ms={g: v for g, v in groups.items() if v > 0}, ops=ops, nodes=nodes,
                   node_count=len(nodes), notes=notes)


# XNNPACK's operator names (ETDump events inside the delegate) → profile classes. XNNPACK names
# an op "<Kind> (<layout>, <dtype>) <microkernel>"; the kind decides.
_XNN_GROUPS = (
    ("conv / matmul / gemm", COMPUTE, ("Convolution", "Deconvolution", "Fully Connected", "Batch Matrix Multiply")),
    ("reshape / layout / copy", MEMORY, ("Transpose", "Copy", "Static Reshape", "Concatenate", "Slice",
                                         "Constant Pad", "Static Slice", "Convert", "Resize", "Even Split")),
    ("softmax", MEMORY, ("Softmax",)),
    ("pooling / reduction", MEMORY, ("Mean", "Sum", "Average Pooling", "Max Pooling", "Global Average Pooling",
                                     "Max (ND)")),
    ("elementwise / activation", MEMORY, ("Add", "Subtract", "Multiply", "Divide", "GELU", "Sigmoid", "HardSwish",
                                          "Clamp", "Square Root", "Reciprocal Square Root", "Exp", "Tanh",
                                          "Negate", "Square", "Abs", "Leaky ReLU", "ELU", "Minimum", "Maximum",
                                          "Log", "Sine", "Cosine", "Floor", "Ceiling")),
)


def classify_xnnpack(event: str) -> tuple[str, str]:
    """(class, group) of an ExecuTorch profile event: an XNNPACK operator, or a portable kernel."""
    for group, cls, kinds in _XNN_GROUPS:
        if any(event.startswith(k) for k in kinds):
            return cls, group
    op = event.split("::")[-1].split(".")[0]
    if op in ("convolution", "addmm", "mm", "bmm", "linear"):
        return COMPUTE, "conv / matmul / gemm"
    if op in ("grid_sampler_2d", "native_layer_norm", "native_group_norm", "expand_copy", "select_copy",
              "split_with_sizes_copy", "squeeze_copy", "_to_dim_order_copy", "index", "arange", "repeat"):
        return MEMORY, "normalisation" if "norm" in op else "reshape / layout / copy"
    return OTHER, "other"


def profile_pte(path: Path, *, model: str | None = None, passes: str = "", threads: int = 2, runs: int = 50,
                warmup: int = 5, progress: Callback | None = None) -> Profile:
    """Profile one ``.pte`` through ExecuTorch's devtools: ETDump events (each XNNPACK operator inside
    the delegate, each portable kernel outside it) over ``runs`` runs after ``warmup`` unprofiled
    ones, aggregated by ``executorch.devtools.Inspector``; per event the median over the runs."""
    import torch

    from ..exporters.pte import PteRunner
    from ..quiet import quiet_native

    if runs < 1:
        raise EdgeExportError(f"--runs must be at least 1, got {runs}")
    warm = PteRunner(Path(path), threads)
    shape = warm.inputs[0]["shape"]
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    for i in range(warmup):
        warm.method.execute([x])
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="edgevit-profile-") as tmp, quiet_native():
        program = Runtime.get().load_program(Path(path), enable_etdump=True, debug_buffer_size=0)
        method = program.load_method("forward")
        walls, last = [], 0.0
        for i in range(runs):
            t = time.perf_counter()
            method.execute([x])
            walls.append((time.perf_counter() - t) * 1e3)
            if time.perf_counter() - last > 0.1 or i + 1 == runs:
                last = time.perf_counter()
                emit(progress, "profile (ETDump)", i + 1, runs)
        etdump = os.path.join(tmp, "run.etdp")
        program.write_etdump_result_to_file(etdump, os.path.join(tmp, "debug.bin"))
        df = Inspector(etdump_path=etdump).to_dataframe()
    nodes, ops = [], {}
    for name, raw, delegated in zip(df["event_name"], df["raw"], df["is_delegated_op"]):
        if name.startswith(("Method::", "Program::")) or name == "DELEGATE_CALL" or not len(raw):
            continue
        kind = re.sub(r" #\d+$", "", str(name))
        ms = float(np.median(raw[-runs:]))
        cls, group = classify_xnnpack(kind)
        nodes.append(NodeStat(str(name), kind, cls, ms, 0.0, None, "DWConv" in kind))
        o = ops.setdefault(kind, [cls, group, 0, 0.0])
        o[2] += 1
        o[3] += ms
    total = sum(n.ms for n in nodes)
    for n in nodes:
        n.share = n.ms / total if total else 0.0
    nodes.sort(key=lambda n: -n.ms)
    op_stats = sorted((OpStat(k, c, g, n, ms, ms / total if total else 0.0) for k, (c, g, n, ms) in ops.items()),
                      key=lambda o: -o.ms)
    by = {"compute": 0.0, "memory": 0.0, "other": 0.0}
    groups = {g: 0.0 for g in GROUP_ORDER}
    for o in op_stats:
        by["compute" if o.cls == COMPUTE else "memory" if o.cls == MEMORY else "other"] += o.ms
        groups[o.group] += o.ms
    unknown = sorted({o.op_type for o in op_stats if o.cls == OTHER})
    notes = [f"not classified (counted as other): {', '.join(unknown)}"] if unknown else []
    return Profile(model=model or Path(path).stem, res=(shape[2], shape[3]), passes=passes, threads=threads,
                   runs=runs, path=str(path), run_ms=float(np.median(walls)), kernel_ms=total,
                   compute_ms=by["compute"], memory_ms=by["memory"], other_ms=by["other"],
                   depthwise_ms=sum(n.ms for n in nodes if n.depthwise),
                   groups_ms={g: v for g, v in groups.items() if v > 0}, ops=op_stats, nodes=nodes,
                   node_count=len(nodes), notes=notes, runtime="executorch")


def parse_passes_variants(passes: str, compare: bool) -> list[str]:
    """``--passes none,default`` (only none/default items) or ``--compare`` → several variants;
    any other value is one pass spec (e.g. ``fold_batchnorm,static_shapes``)."""
    items = [s.strip() for s in passes.split(",") if s.strip()]
    if len(items) > 1 and all(s in ("none", "default") for s in items):
        variants = list(dict.fromkeys(items))
    else:
        variants = [passes]
    if compare and "none" not in variants:
        variants = ["none"] + variants
    return variants


def run_profile(model: str, res: str | int | None = None, *, passes: str = "default", compare: bool = False,
                threads: int = 2, runs: int = 50, warmup: int = 5, cache_dir: str | Path | None = None,
                runtime: str = "ort", progress: Callback | None = None) -> list[Profile]:
    """Profile a model name (exported through the bench cache, per passes variant) or a file."""
    from ..exporters.artifacts import prepare_out_dir
    from ..passes import resolve_passes

    if runs < 1:
        raise EdgeExportError(f"--runs must be at least 1, got {runs}")
    from ..calibration.options import check_threads

    check_threads(threads)
    if runtime not in ("ort", "executorch"):
        raise EdgeExportError(f"unknown runtime '{runtime}' for profile; use ort or executorch")
    fmt = "pte" if runtime == "executorch" else "onnx"
    if runtime == "executorch":
        from ..exporters import pte

        pte.validate_options()
    specs = parse_models(model)
    if len(specs) != 1:
        raise EdgeExportError("profile takes one model (a name or an .onnx file)")
    spec: ModelSpec = specs[0]
    if spec.is_file and runtime == "executorch":
        raise EdgeExportError("profile --runtime executorch takes a model name (exported to .pte through the cache)")
    variants = parse_passes_variants(passes, compare)
    for v in variants:
        resolve_passes(v, fmt)
    p = plan([spec], [None if res is None else str(res)], 1, "ort")[0]
    if spec.is_file:
        if len(variants) > 1:
            raise EdgeExportError("--compare / several --passes need a model name, not an .onnx file "
                                  "(the passes are applied at export)")
        return [profile_onnx(spec.path, model=spec.name, res=p.hw, passes="(file)", threads=threads, runs=runs,
                             warmup=warmup, progress=prefixed(progress, f"{p.item}: "))]
    cdir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    prepare_out_dir(cdir)
    out = []
    for v in variants:
        step = prefixed(progress, f"{p.item} passes={v}: ")
        emit(step, "checking the export cache")
        path, _manifest, _cached = cached_export(spec.name, p.hw, batch=1, passes=v, cache_dir=cdir,
                                                 progress=prefixed(step, "export: "), format=fmt)
        if runtime == "executorch":
            out.append(profile_pte(path, model=spec.name, passes=v, threads=threads, runs=runs, warmup=warmup,
                                   progress=step))
        else:
            out.append(profile_onnx(path, model=spec.name, res=p.hw, passes=v, threads=threads, runs=runs,
                                    warmup=warmup, progress=step))
    return out

