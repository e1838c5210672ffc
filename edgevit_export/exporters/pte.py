"""ExecuTorch: the rewritten ExportedProgram lowered to the XNNPACK delegate, saved as ``.pte``; run
by ExecuTorch's own runtime (``executorch.runtime``), the one an Android or iOS app links.

Lowering: ``to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])``. Every op
the partitioner takes lands in an XNNPACK subgraph; every op it does not take runs on ExecuTorch's
portable kernels, and each such op is a delegate boundary. The manifest carries the delegation
report: delegate subgraphs, nodes delegated and left on portable kernels by op type, and the share
of the model's MACs (convolutions, linear layers, matrix products) that runs inside delegates.

Checks: numeric — the saved ``.pte`` in ExecuTorch against PyTorch, ≤ 1e-4 of the output's scale
(fp32, like ONNX); structural — read back from the file itself: every MAC-carrying op inside an
XNNPACK delegate (one left on portable kernels runs many times slower: the check fails and names
it), static shapes.

The format contract (see ``exporters/__init__.py``): ``validate_options``, ``convert``, ``load``,
``describe``, ``structure``, ``gate``.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import operator
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import CannotRun, EdgeExportError, first_line
from ..quiet import quiet_native
from .check import Gate

INSTALL = "pip install 'edgevit-export[pte]'  (or: pip install executorch==1.5.1)"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
TOLERANCE = 1e-4
BACKEND = "XnnpackBackend"
# ops that carry multiply-accumulates, as they appear in edge programs (the rest is memory-bound)
MAC_OPS = ("convolution", "linear", "addmm", "mm", "bmm", "matmul", "baddbmm")
_SCALAR_TYPES = {6: "float32", 5: "float16", 4: "int64", 3: "int32", 1: "int8", 0: "uint8", 11: "bool"}


def _quiet_import():
    """Import ExecuTorch without the noise its dependencies print (torchao's optional CUDA
    kernels, pytree deprecation warnings); a missing install is one line with the install command."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), quiet_native():
            warnings.simplefilter("ignore")
            import executorch.exir  # noqa: F401
            from executorch.runtime import Runtime  # noqa: F401
    except ImportError:
        raise EdgeExportError(f"--format pte needs ExecuTorch, which is not installed: {INSTALL}") from None


def available() -> bool:
    try:
        _quiet_import()
    except EdgeExportError:
        return False
    return True


def validate_options(*, output=None, **_ignored) -> dict:
    if output is not None and Path(output).suffix != ".pte":
        raise EdgeExportError(f"ExecuTorch output path must end in .pte, got '{output}'")
    _quiet_import()
    return {"delegate": "xnnpack", "tensor_input": True}


# --- lowering and the delegation report -----------------------------------------------------------

def lower(program: torch.export.ExportedProgram):
    """The edge program lowered to XNNPACK (``EdgeProgramManager``), without ExecuTorch's chatter."""
    _quiet_import()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])


def _short(target) -> str:
    """``aten.native_group_norm.default`` → ``native_group_norm`` (edge and ATen overloads alike)."""
    name = getattr(target, "__name__", str(target))
    if name == "getitem":
        return name
    parts = name.replace("::", ".").split(".")
    return parts[1] if parts[0] in ("aten", "dim_order_ops", "quantized_decomposed") and len(parts) > 1 else parts[0]


def _macs(node) -> int:
    """Multiply-accumulates of one edge node (0 for ops that carry none)."""
    op = _short(node.target)
    if op.endswith("_copy"):
        op = op[:-5]
    if op not in MAC_OPS:
        return 0
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0
    args = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in node.args]
    if op == "convolution":
        w = args[1]
        return int(out.numel() * int(np.prod(w.shape[1:])))
    if op == "linear":
        return int(out.numel() * args[1].shape[-1])
    a = args[1] if op in ("addmm", "baddbmm") else args[0]
    return int(out.numel() * a.shape[-1])


def _tally(graph, nodes: collections.Counter, macs: collections.Counter) -> None:
    """Count the compute nodes of ``graph`` by op (tuple unpacking and delegate calls are not
    compute) and their multiply-accumulates by op."""
    for n in graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        op = _short(n.target)
        if op == "executorch_call_delegate":
            continue
        nodes[op] += 1
        if _macs(n):
            macs[op] += _macs(n)


def delegation(edge) -> dict:
    """What the XNNPACK partitioner took: delegate subgraphs, nodes by op type inside delegates and
    left on portable kernels, and the share of MACs inside delegates (from the lowered program)."""
    gm = edge.exported_program().graph_module
    delegated, portable = collections.Counter(), collections.Counter()
    macs_in, macs_out = collections.Counter(), collections.Counter()
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and _short(n.target) == "executorch_call_delegate"]
    for n in calls:
        _tally(getattr(gm, n.args[0].target).original_module.graph, delegated, macs_in)
    _tally(gm.graph, portable, macs_out)
    total = sum(macs_in.values()) + sum(macs_out.values())
    return {
        "backend": BACKEND,
        "delegate_subgraphs": len(calls),
        "nodes_delegated": sum(delegated.values()),
        "nodes_portable": sum(portable.values()),
        "delegated_by_op": dict(delegated.most_common()),
        "portable_by_op": dict(portable.most_common()),
        "macs_delegated": sum(macs_in.values()),
        "macs_portable": sum(macs_out.values()),
        "mac_share_delegated": sum(macs_in.values()) / total if total else 1.0,
        "portable_mac_ops": dict(macs_out.most_common()),
        "why_portable": {op: WHY.get(op, "no XNNPACK equivalent in ExecuTorch's partitioner")
                         for op in portable},
    }


# why an op stays on portable kernels (the XNNPACK partitioner's configs in ExecuTorch 1.5), and what fixes it
WHY = {
    "native_group_norm": "XNNPACK has no GroupNorm (the pte pipeline's decompose_norms pass rewrites it)",
    "native_layer_norm": "XNNPACK has no LayerNorm (the pte pipeline's decompose_norms pass rewrites it)",
    "split_with_sizes_copy": "the partitioner takes no split (split_to_slices rewrites it as slices)",
    "expand_copy": "the partitioner takes no expand (matmul_to_bmm keeps matmuls from broadcasting)",
    "grid_sampler_2d": "XNNPACK has no grid sampling (bilinear sampling at learned offsets): it stays portable",
    "mean": "XNNPACK's mean is a global average pool: 4-D input, dims (2, 3), keepdim",
}


def convert(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path, options: dict,
            meta=None) -> dict:
    """Lower ``program`` to XNNPACK and write the ``.pte`` to ``path``; returns facts for the manifest."""
    try:
        edge = lower(program)
        report = delegation(edge)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            et = edge.to_executorch()
    except EdgeExportError:
        raise
    except Exception as e:   # the lowering failed on an op: a bug here or in ExecuTorch, said in one line
        raise EdgeExportError(f"ExecuTorch could not lower this program to XNNPACK: {first_line(e)[:300]}") from None
    Path(path).write_bytes(et.buffer)
    facts = describe(path)
    names = meta and meta.output_names
    if names:   # a .pte keeps no output names: the manifest's io gives them (the runner reads them there)
        for d, n in zip(facts["io_spec"]["outputs"], names):
            d["name"] = n
    return {"delegate": "xnnpack", "delegation": report, "ops": facts["ops"], "io": facts["io_spec"],
            "bytes": Path(path).stat().st_size}


# --- the file: describe what the saved program does -----------------------------------------------

def _program(path: Path):
    _quiet_import()
    from executorch.exir._serialize._program import deserialize_pte_binary

    try:
        return deserialize_pte_binary(Path(path).read_bytes()).program
    except Exception as e:
        raise EdgeExportError(f"{Path(path).name} is not a readable ExecuTorch program ({first_line(e)[:120]}); "
                              "re-export it") from None


def _tensor_spec(value, name: str) -> dict:
    t = value.val
    return {"name": name, "shape": [int(s) for s in t.sizes], "dtype": _SCALAR_TYPES.get(int(t.scalar_type),
                                                                                       str(t.scalar_type)),
            "kind": "tensor"}


def describe(path: Path) -> dict:
    """From the ``.pte`` itself: instructions by kind (delegate calls by backend, portable kernel
    calls by op), the inputs and outputs, whether every tensor shape is static."""
    prog = _program(path)
    plan = prog.execution_plan[0]
    kernels: collections.Counter = collections.Counter()
    backends: collections.Counter = collections.Counter()
    for instr in plan.chains[0].instructions:
        kind = type(instr.instr_args).__name__
        if kind == "KernelCall":
            kernels[plan.operators[instr.instr_args.op_index].name.split("::")[-1]] += 1
        elif kind == "DelegateCall":
            backends[plan.delegates[instr.instr_args.delegate_index].id] += 1
    dynamic = sum(1 for v in plan.values if type(v.val).__name__ == "Tensor" and int(v.val.shape_dynamism) != 0)
    ins = [_tensor_spec(plan.values[i], INPUT_NAME if k == 0 else f"input_{k}") for k, i in enumerate(plan.inputs)]
    outs = [_tensor_spec(plan.values[i], OUTPUT_NAME if k == 0 else f"output_{k}")
            for k, i in enumerate(plan.outputs)]
    return {"method": plan.name, "delegate_calls": dict(backends), "portable_calls": dict(kernels.most_common()),
            "ops": {**{f"delegate:{b}": c for b, c in backends.items()}, **dict(kernels.most_common())},
            "dynamic": dynamic, "io_spec": {"inputs": ins, "outputs": outs},
            "max_rank": max((len(v.val.sizes) for v in plan.values if type(v.val).__name__ == "Tensor"), default=0)}


def structure(facts: dict, options: dict) -> dict:
    problems = []
    mac_ops = [op for op in facts["portable_calls"] if any(op.startswith(m) for m in MAC_OPS)]
    if mac_ops:
        problems.append(f"MAC-carrying ops on portable kernels: {', '.join(mac_ops)} — these run many times slower "
                        "than inside XNNPACK")
    if not facts["delegate_calls"]:
        problems.append("nothing was delegated to XNNPACK")
    if facts["dynamic"]:
        problems.append(f"{facts['dynamic']} tensors with dynamic shape")
    delegates = sum(facts["delegate_calls"].values())
    portable = sum(facts["portable_calls"].values())
    summary = "; ".join(problems) or (
        f"{delegates} XNNPACK delegate call{'s' if delegates != 1 else ''}, {portable} portable kernel call"
        f"{'s' if portable != 1 else ''}" + (f" ({', '.join(f'{k} {v}' for k, v in facts['portable_calls'].items())})"
                                             if portable else "") + ", all shapes static")
    return {"passed": not problems, "max_rank": facts["max_rank"], "summary": summary,
            "delegate_calls": delegates, "portable_calls": portable}


def gate(options: dict, trained: bool) -> Gate:
    return Gate(TOLERANCE)


# --- the runner -----------------------------------------------------------------------------------

def set_threads(threads: int) -> None:
    """ExecuTorch's process-wide thread pool (XNNPACK runs on it)."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

    if _threadpool_get_thread_count() != threads:
        _unsafe_reset_threadpool(threads)


def _check_header(path: Path) -> None:
    """What the runtime would abort the process on (a failed ET_CHECK, not an exception): a file
    that is not an ExecuTorch program (flatbuffer identifier ``ET`` + 2 digits at byte 4), or one
    shorter than its extended header ("eh00": program size, segment offset and size) declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(40)
    if len(head) < 8 or head[4:6] != b"ET" or not head[6:8].isdigit():
        raise CannotRun(f"{path.name} is not an ExecuTorch program (no 'ET' flatbuffer identifier); "
                        "export it again with 'edgevit-export export MODEL --format pte'")
    if head[8:12] == b"eh00" and len(head) >= 40:
        program, base, data = (int.from_bytes(head[i:i + 8], "little") for i in (16, 24, 32))
        if program > size or (data and base + data > size):
            raise CannotRun(f"{path.name} is cut short ({size:,} bytes; its header declares "
                            f"{max(program, base + data):,}); export or copy it again")


class PteRunner:
    """A ``.pte`` in ExecuTorch's runtime (``executorch.runtime.Runtime``: portable kernels and the
    XNNPACK delegate, ``threads`` threads)."""

    def __init__(self, path: Path, threads: int = 2):
        _quiet_import()
        from executorch.runtime import Runtime

        self.path = Path(path)
        _check_header(self.path)
        with quiet_native():
            set_threads(threads)
            try:
                self.program = Runtime.get().load_program(self.path)
                self.method = self.program.load_method("forward")
            except Exception as e:
                raise CannotRun(f"ExecuTorch cannot load {self.path.name}: {first_line(e)[:200]}") from None
        meta = self.method.metadata
        self.inputs = [_info(meta.input_tensor_meta(i), INPUT_NAME if i == 0 else f"input_{i}")
                       for i in range(meta.num_inputs())]
        names = _manifest_output_names(self.path, meta.num_outputs())
        self.outputs = [_info(meta.output_tensor_meta(i), names[i]) for i in range(meta.num_outputs())]
        self.classifier = False
        self.labels = None
        self.runtime = f"ExecuTorch {_version()} (XNNPACK delegate + portable kernels), {threads} threads"

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [d["name"] for d in self.inputs if d["name"] not in inputs]
        if missing:
            raise EdgeExportError(f"{self.path.name} takes input '{missing[0]}'; it was not given")
        feeds = [torch.from_numpy(np.ascontiguousarray(inputs[d["name"]], dtype=np.float32)) for d in self.inputs]
        for d, f in zip(self.inputs, feeds):
            if list(f.shape) != d["shape"]:
                raise EdgeExportError(f"{self.path.name} takes {d['name']} of shape {tuple(d['shape'])}, "
                                      f"got {tuple(f.shape)}; re-export at that resolution and batch")
        outs = self.method.execute(feeds)
        return {d["name"]: o.detach().numpy().copy() for d, o in zip(self.outputs, outs)}

    numeric = __call__

    def prepared(self, inputs: dict[str, np.ndarray]):
        """The bare call a latency measurement times: the method on ``inputs``, converted once."""
        feeds = [torch.from_numpy(np.ascontiguousarray(inputs[d["name"]], dtype=np.float32)) for d in self.inputs]
        return lambda: self.method.execute(feeds)


def _manifest_output_names(path: Path, count: int) -> list[str]:
    """Output names from the manifest beside the ``.pte`` (its ``io``), which the program itself does
    not keep; ``logits``, ``output_1``, … without one."""
    from . import get

    default = [OUTPUT_NAME if i == 0 else f"output_{i}" for i in range(count)]
    try:
        outs = json.loads(get("pte").manifest_path(path).read_text())["io"]["outputs"]
        names = [str(o["name"]) for o in outs]
    except (OSError, ValueError, KeyError, TypeError):
        return default
    return names if len(names) == count else default


def _info(t, name: str) -> dict:
    return {"name": name, "shape": [int(d) for d in t.sizes()], "dtype": _SCALAR_TYPES.get(int(t.dtype()), str(t.dtype())),
            "kind": "tensor"}


def _version() -> str:
    import importlib.metadata as md

    return md.version("executorch")


def load(path: Path, threads: int = 2) -> PteRunner:
    return PteRunner(path, threads)


# --- inspect: how the delegate partitions a program -----------------------------------------------

def report(program: torch.export.ExportedProgram, example: torch.Tensor) -> dict:
    """For ``inspect --format pte``: the delegation of ``program`` lowered to XNNPACK, as rows
    (label → value) and the full report."""
    d = delegation(lower(program))
    portable = ", ".join(f"{k} {v}" for k, v in d["portable_by_op"].items()) or "none"
    rows = {"XNNPACK delegate subgraphs": d["delegate_subgraphs"], "nodes delegated": d["nodes_delegated"],
            "nodes on portable kernels": d["nodes_portable"],
            "MACs inside delegates": f"{100 * d['mac_share_delegated']:.1f}%", "portable ops": portable}
    return {"title": "ExecuTorch XNNPACK delegation", "rows": rows, "detail": d}
