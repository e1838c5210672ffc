"""LiteRT (TensorFlow Lite): the rewritten ExportedProgram converted by litert-torch to a
``.tflite`` flatbuffer; run by LiteRT's interpreter with its default XNNPACK delegate, the CPU
path an Android app gets.

Conversion: ``litert_torch.convert(module, sample_kwargs={"images": x})`` on the rewritten
program's module, wrapped so the signature reads ``serving_default(images) -> logits`` (the names an
app's signature runner uses). ``--layout nhwc`` wraps it with ``litert_torch.to_channel_last_io``:
the input becomes (N, H, W, 3), the interleaved buffer a camera or bitmap gives, and the transpose
to PyTorch's NCHW moves into the model (where the converter folds it into its own layout handling).

What the manifest records, from the file itself: ops by type, the XNNPACK delegate's partitions
and the ops it leaves to LiteRT's builtin kernels (each is a partition boundary), the TRANSPOSE
count (PyTorch's NCHW against LiteRT's NHWC kernels), the input contract.

Checks: numeric — the saved ``.tflite`` in the interpreter against PyTorch, ≤ 1e-4 of the output's
scale (fp32); structural — every MAC-carrying op inside the XNNPACK delegate (one left to the
builtin kernels runs several times slower: the check fails and names it), static shapes.

The format contract (see ``exporters/__init__.py``): ``validate_options``, ``convert``, ``load``,
``describe``, ``structure``, ``gate``, and ``report`` for ``inspect``.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import CannotRun, EdgeExportError, first_line
from ..quiet import quiet_native
from .check import Gate

INSTALL = "pip install 'edgevit-export[tflite]'  (or: pip install litert-torch==0.10.0)"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
TOLERANCE = 1e-4
LAYOUTS = ("nchw", "nhwc")
# builtin ops that carry multiply-accumulates (the rest is memory-bound)
MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONV_3D")
DELEGATE_OP = "DELEGATE"

# why XNNPACK (LiteRT's delegate, as of ai-edge-litert 2.3) leaves an op to the builtin kernels
WHY = {
    "FULLY_CONNECTED": "a fully-connected layer whose weights are computed at run time (a matmul the converter "
                       "folded into FULLY_CONNECTED): XNNPACK takes only constant weights",
    "GATHER_ND": "XNNPACK has no gather (grid sampling, indexing)",
    "SELECT": "XNNPACK has no select (masks)", "SELECT_V2": "XNNPACK has no select (masks)",
    "LESS": "XNNPACK has no comparisons", "GREATER_EQUAL": "XNNPACK has no comparisons",
    "LOGICAL_AND": "XNNPACK has no logical ops", "CAST": "XNNPACK has no casts between float and integer",
    "BROADCAST_TO": "XNNPACK takes no explicit broadcast",
}


def _quiet_import():
    """Import litert-torch and the interpreter without their start-up chatter; a missing install
    is one line with the install command."""
    for name in ("absl", "jax", "litert_torch", "torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), quiet_native():
            warnings.simplefilter("ignore")
            from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError:
        raise EdgeExportError(f"--format tflite needs LiteRT, which is not installed: {INSTALL}") from None


def _converter():
    _quiet_import()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), quiet_native():
            warnings.simplefilter("ignore")
            import litert_torch
    except ImportError:
        raise EdgeExportError(f"--format tflite needs litert-torch, which is not installed: {INSTALL}") from None
    litert_torch.config.show_progress = False
    return litert_torch


def available() -> bool:
    try:
        _converter()
    except EdgeExportError:
        return False
    return True


def validate_options(*, output=None, layout: str = "nchw", **_ignored) -> dict:
    if output is not None and Path(output).suffix != ".tflite":
        raise EdgeExportError(f"LiteRT output path must end in .tflite, got '{output}'")
    layout = (layout or "nchw").lower()
    if layout not in LAYOUTS:
        raise EdgeExportError(f"unknown --layout '{layout}'; use nchw (PyTorch's, the default) or nhwc "
                              "(an interleaved camera/bitmap buffer)")
    _converter()
    return {"delegate": "xnnpack", "tensor_input": True, "layout": layout}


# --- conversion -----------------------------------------------------------------------------------

class _Signature(torch.nn.Module):
    """The program under the names an app's signature runner sees: ``images`` in, ``logits`` (or a
    backbone's ``feat_s<stride>`` maps) out."""

    def __init__(self, module: torch.nn.Module, output_names: list[str] | None = None):
        super().__init__()
        self.module = module
        self.output_names = output_names

    def forward(self, images):
        out = self.module(images)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        names = self.output_names or [OUTPUT_NAME if i == 0 else f"output_{i}" for i in range(len(outs))]
        return dict(zip(names, outs))


def convert(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path, options: dict,
            meta=None) -> dict:
    """Convert ``program`` with litert-torch and write the ``.tflite`` to ``path``; returns facts
    for the manifest."""
    return convert_module(program.module(), example, path, options, output_names=meta and meta.output_names)


def convert_module(module: torch.nn.Module, example: torch.Tensor, path: Path, options: dict,
                   quant_config=None, output_names: list[str] | None = None) -> dict:
    """Convert a graph module (a program's, or a PT2E-converted int8 one with its ``quant_config``)."""
    litert_torch = _converter()
    x = example
    if options.get("layout") == "nhwc":
        module = litert_torch.to_channel_last_io(module, args=[0])
        x = example.permute(0, 2, 3, 1).contiguous()
    wrapped = _Signature(module, output_names)
    wrapped.training = False   # not .eval(): an exported program's module refuses train()/eval(); it is in eval already
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_native():
            warnings.simplefilter("ignore")
            model = litert_torch.convert(wrapped, sample_kwargs={INPUT_NAME: x}, quant_config=quant_config)
            content = model.model_content()
    except EdgeExportError:
        raise
    except Exception as e:   # the converter failed on an op: a bug here or in litert-torch, said in one line
        raise EdgeExportError(f"litert-torch could not convert this program: {first_line(e)[:300]}") from None
    # written here, not by the converter's C++ writer: a full disk is then an OSError (one line),
    # where the native writer ends the process without a word
    Path(path).write_bytes(content)
    facts = describe(path)
    return {"delegate": "xnnpack", "layout": options.get("layout", "nchw"), "delegation": facts["delegation"],
            "ops": facts["ops"], "io": facts["io_spec"], "bytes": Path(path).stat().st_size}


# --- the file: describe what the interpreter runs ------------------------------------------------

def _interpreter(path: Path, threads: int):
    _quiet_import()
    from ai_edge_litert.interpreter import Interpreter

    try:
        with quiet_native():
            it = Interpreter(model_path=str(path), num_threads=threads)
            it.allocate_tensors()
    except Exception as e:
        raise CannotRun(f"LiteRT cannot load {Path(path).name}: {first_line(e)[:200]}") from None
    return it


def _dtype(t) -> str:
    return np.dtype(t).name


def _spec(d: dict, name: str, layout: str = "nchw") -> dict:
    q = d.get("quantization") or (0.0, 0)
    spec = {"name": name, "shape": [int(s) for s in d["shape"]], "dtype": _dtype(d["dtype"]), "kind": "tensor",
            "tensor": d["name"]}
    if layout == "nhwc":
        spec["layout"] = "nhwc"
    if q[0]:
        spec["quantization"] = {"scale": float(q[0]), "zero_point": int(q[1])}
    return spec


def delegation(it) -> dict:
    """Which of the model's ops the XNNPACK delegate replaced: each DELEGATE node stands for the
    ops between its inputs and outputs (traced back through their producers); the rest run on the
    builtin kernels, and each is a partition boundary."""
    ops = it._get_ops_details()
    producer = {int(t): o["index"] for o in ops if o["op_name"] != DELEGATE_OP for t in o["outputs"]}
    delegates = [o for o in ops if o["op_name"] == DELEGATE_OP]
    inside: set[int] = set()
    for d in delegates:
        stop = {int(t) for t in d["inputs"]}
        todo = [int(t) for t in d["outputs"]]
        while todo:
            t = todo.pop()
            n = producer.get(t)
            if t in stop or n is None or n in inside:
                continue
            inside.add(n)
            todo.extend(int(i) for i in ops[n]["inputs"] if i != -1)
    model_ops = [o for o in ops if o["op_name"] != DELEGATE_OP]
    outside = collections.Counter(o["op_name"] for o in model_ops if o["index"] not in inside)
    return {"backend": "XNNPACK", "delegate_partitions": len(delegates), "ops_delegated": len(inside),
            "ops_outside": sum(outside.values()), "outside_by_op": dict(outside.most_common()),
            "why_outside": {op: WHY.get(op, "XNNPACK does not take it") for op in outside}}


def _io(it) -> tuple[list[dict], list[dict]]:
    """The interpreter's inputs and outputs as specs, under the signature's names (``images``,
    ``logits``), in the interpreter's order, each with its tensor ``index``. An (N, H, W, 3) input
    is an NHWC one (``--layout nhwc``)."""
    sig = it.get_signature_list().get("serving_default", {})
    ins, outs = it.get_input_details(), it.get_output_details()
    by_index = {int(i): n for n, i in it._get_full_signature_list().get("serving_default", {}).get("outputs", {}).items()}
    shape = ins[0]["shape"]
    layout = "nhwc" if len(shape) == 4 and shape[-1] == 3 and shape[1] != 3 else "nchw"
    in_specs = [dict(_spec(d, n, layout), index=int(d["index"]))
                for d, n in zip(ins, _ordered(ins, sig.get("inputs") or [INPUT_NAME]))]
    out_specs = [dict(_spec(d, by_index.get(int(d["index"]), n)), index=int(d["index"]))
                 for d, n in zip(outs, _ordered(outs, sig.get("outputs") or [OUTPUT_NAME]))]
    return in_specs, out_specs


def describe(path: Path) -> dict:
    """From the ``.tflite`` in the interpreter: ops by type, the delegation, the TRANSPOSE count,
    inputs and outputs (with quantization), tensor ranks and whether every shape is static."""
    it = _interpreter(path, 1)
    ops = collections.Counter(o["op_name"] for o in it._get_ops_details() if o["op_name"] != DELEGATE_OP)
    ins, outs = _io(it)
    tensors = it.get_tensor_details()
    dynamic = sum(1 for t in tensors if len(t["shape_signature"]) and (t["shape_signature"] < 0).any())
    strip = lambda specs: [{k: v for k, v in d.items() if k != "index"} for d in specs]  # noqa: E731
    return {"ops": dict(ops.most_common()), "nodes": sum(ops.values()), "delegation": delegation(it),
            "transposes": ops.get("TRANSPOSE", 0), "dynamic": dynamic,
            "max_rank": max((len(t["shape"]) for t in tensors), default=0),
            "io_spec": {"inputs": strip(ins), "outputs": strip(outs)}}


def _ordered(details: list[dict], names: list[str]) -> list[str]:
    """The signature's names in the order of the interpreter's tensors (``serving_default_<name>``)."""
    out = []
    for i, d in enumerate(details):
        hit = [n for n in names if d["name"].startswith(f"serving_default_{n}")]
        out.append(hit[0] if hit else (names[i] if i < len(names) else d["name"]))
    return out


def structure(facts: dict, options: dict) -> dict:
    d = facts["delegation"]
    problems = []
    mac_ops = [op for op in d["outside_by_op"] if op in MAC_OPS]
    if mac_ops:
        listed = ", ".join(f"{op} {d['outside_by_op'][op]}" for op in mac_ops)
        problems.append(f"MAC-carrying ops outside XNNPACK: {listed} — "
                        f"{WHY.get(mac_ops[0], 'they run on the slower builtin kernels')}")
    if not d["delegate_partitions"]:
        problems.append("nothing was delegated to XNNPACK")
    if facts["dynamic"]:
        problems.append(f"{facts['dynamic']} tensors with dynamic shape")
    outside = ", ".join(f"{k} {v}" for k, v in d["outside_by_op"].items())
    summary = "; ".join(problems) or (
        f"{d['delegate_partitions']} XNNPACK partition{'s' if d['delegate_partitions'] != 1 else ''}, "
        f"{d['ops_outside']} op{'s' if d['ops_outside'] != 1 else ''} outside" + (f" ({outside})" if outside else "")
        + f", {facts['transposes']} TRANSPOSE, all shapes static")
    return {"passed": not problems, "max_rank": facts["max_rank"], "summary": summary,
            "delegate_partitions": d["delegate_partitions"], "ops_outside": d["ops_outside"],
            "transposes": facts["transposes"]}


def gate(options: dict, trained: bool) -> Gate:
    return Gate(TOLERANCE)


# --- the runner -----------------------------------------------------------------------------------

class TfliteRunner:
    """A ``.tflite`` in LiteRT's interpreter (builtin kernels + the default XNNPACK delegate,
    ``threads`` threads). Float inputs are quantized to an int8/uint8 input tensor with its scale
    and zero point, and int8 outputs dequantized, so callers always deal in floats."""

    def __init__(self, path: Path, threads: int = 2):
        self.path = Path(path)
        self.interpreter = _interpreter(self.path, threads)
        ins, outs = _io(self.interpreter)
        self._in = [(d.pop("index"), d) for d in ins]
        self._out = [(d.pop("index"), d) for d in outs]
        self.inputs = [d for _, d in self._in]
        self.outputs = [d for _, d in self._out]
        self.classifier = False
        self.labels = None
        self.runtime = f"LiteRT {_version()} interpreter (XNNPACK delegate), {threads} threads"

    def set_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        missing = [s["name"] for _, s in self._in if s["name"] not in inputs]
        if missing:
            raise EdgeExportError(f"{self.path.name} takes input '{missing[0]}'; it was not given")
        for index, s in self._in:
            x = np.asarray(inputs[s["name"]])
            if list(x.shape) != s["shape"]:
                raise EdgeExportError(f"{self.path.name} takes {s['name']} of shape {tuple(s['shape'])}"
                                      f"{' (NHWC)' if s.get('layout') == 'nhwc' else ''}, got {tuple(x.shape)}; "
                                      "re-export at that resolution, batch and --layout")
            self.interpreter.set_tensor(index, _to_tensor(x, s))

    def prepared(self, inputs: dict[str, np.ndarray]):
        """The bare call a latency measurement times: ``invoke`` with ``inputs`` set once."""
        self.set_inputs(inputs)
        return self.interpreter.invoke

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.set_inputs(inputs)
        self.interpreter.invoke()
        return {s["name"]: _from_tensor(self.interpreter.get_tensor(index), s) for index, s in self._out}

    numeric = __call__


def _to_tensor(x: np.ndarray, spec: dict) -> np.ndarray:
    q = spec.get("quantization")
    if q and spec["dtype"] in ("int8", "uint8"):
        info = np.iinfo(spec["dtype"])
        return np.clip(np.round(x / q["scale"]) + q["zero_point"], info.min, info.max).astype(spec["dtype"])
    return np.ascontiguousarray(x, dtype=np.float32)


def _from_tensor(y: np.ndarray, spec: dict) -> np.ndarray:
    q = spec.get("quantization")
    if q and spec["dtype"] in ("int8", "uint8"):
        return ((y.astype(np.float32) - q["zero_point"]) * q["scale"]).astype(np.float32)
    return y.copy()


def _version() -> str:
    import importlib.metadata as md

    return md.version("ai-edge-litert")


def load(path: Path, threads: int = 2) -> TfliteRunner:
    return TfliteRunner(path, threads)


# --- inspect: what the delegate takes -------------------------------------------------------------

def report(program: torch.export.ExportedProgram, example: torch.Tensor) -> dict:
    """For ``inspect --format tflite``: the program converted (to a temporary file) and what the
    XNNPACK delegate takes of it, as rows (label → value) and the full facts."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        convert(program, example, path, {"layout": "nchw"})
        facts = describe(path)
    d = facts["delegation"]
    rows = {"XNNPACK partitions": d["delegate_partitions"], "ops delegated": d["ops_delegated"],
            "ops outside XNNPACK": ", ".join(f"{k} {v}" for k, v in d["outside_by_op"].items()) or "none",
            "TRANSPOSE ops": facts["transposes"], "ops": facts["nodes"]}
    return {"title": "LiteRT XNNPACK delegation", "rows": rows, "detail": facts}
