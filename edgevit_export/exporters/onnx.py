"""ONNX: the rewritten ExportedProgram → a static-shape ONNX model, simplified; run by onnxruntime.

The format contract (see ``exporters/__init__.py``): ``validate_options``, ``convert``, ``load``,
``describe``, ``structure``, ``gate``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import EdgeExportError, first_line
from ..ort import user_session
from .check import Gate

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
TOLERANCE = 1e-4
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
           onnx.TensorProto.INT32: "int32", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8"}


def validate_options(*, output=None, opset: int = 18, **_ignored) -> dict:
    if opset < 17:
        raise EdgeExportError(f"--opset {opset} is too old; use 17 or newer (default 18)")
    if output is not None and Path(output).suffix != ".onnx":
        raise EdgeExportError(f"ONNX output path must end in .onnx, got '{output}'")
    return {"opset": opset, "tensor_input": True}


def convert(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path, options: dict,
            meta=None, *, simplify: bool = True) -> dict:
    """Write ``program`` as ONNX to ``path``; returns facts for the manifest."""
    opset = options.get("opset", 18)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        onnx_program = torch.onnx.export(
            program, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=(meta and meta.output_names) or [OUTPUT_NAME], optimize=True, verbose=False)
    model = onnx_program.model_proto
    modules = module_paths(model)      # onnxsim drops the exporter's node metadata: read it first
    simplified = False
    note = ""
    if simplify:
        try:
            import onnxsim

            sim, ok = onnxsim.simplify(model)
            if ok:
                model, simplified = sim, True
            else:
                note = "onnxsim could not validate its result; kept the unsimplified model"
        except Exception as e:  # onnxsim failing must not lose an otherwise valid export
            note = f"onnxsim failed ({type(e).__name__}); kept the unsimplified model"
    tag_modules(model, modules)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"opset": opset, "simplified": simplified, "note": note, "nodes": len(model.graph.node),
            "ops": _op_counts(model), "io": _io(model)}


MODULE_KEY = "module"


def module_paths(model: onnx.ModelProto) -> dict[str, str]:
    """Node name → the dotted path of the innermost module of ours it came from, read from the
    torch exporter's ``pkg.torch.onnx.name_scopes`` (the module scopes, then the fx node's name).
    Nodes our passes built without a module (or the exporter's own glue) are left out."""
    import ast

    out = {}
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = [s for s in ast.literal_eval(p.value)[:-1] if isinstance(s, str) and s]
                except (ValueError, SyntaxError):
                    scopes = []
                if scopes:
                    out[n.name] = scopes[-1]
    return out


def tag_modules(model: onnx.ModelProto, modules: dict[str, str]) -> None:
    """Write each node's module path into its metadata (``module``): Netron shows it, and
    ``profile`` maps onnxruntime's node names back to the model through it."""
    for n in model.graph.node:
        if n.name in modules and not any(p.key == MODULE_KEY for p in n.metadata_props):
            n.metadata_props.add(key=MODULE_KEY, value=modules[n.name])


def node_modules(path: Path) -> dict[str, tuple[str, str, list[str]]]:
    """For a saved ONNX file: every node name and every output name → (module path or '', op type,
    the node's inputs). onnxruntime names the nodes it creates after these."""
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, tuple[str, str, list[str]]] = {}
    for n in model.graph.node:
        module = next((p.value for p in n.metadata_props if p.key == MODULE_KEY), "")
        entry = (module, n.op_type, list(n.input))
        for key in (*n.output, n.name):
            out.setdefault(key, entry)
    return out


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _value_info(v) -> dict:
    t = v.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return {"name": v.name, "shape": dims, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "kind": "tensor"}


def _io(model: onnx.ModelProto) -> dict:
    inits = {i.name for i in model.graph.initializer}
    return {"inputs": [_value_info(v) for v in model.graph.input if v.name not in inits],
            "outputs": [_value_info(v) for v in model.graph.output]}


class OnnxRunner:
    """An ONNX file in onnxruntime (CPU, ``threads`` intra-op threads, all graph optimisations)."""

    def __init__(self, path: Path, threads: int = 2):
        self.session = user_session(Path(path), threads=threads)
        self.path = Path(path)
        self.inputs = [{"name": i.name, "shape": list(i.shape), "dtype": _ort_dtype(i.type), "kind": "tensor"}
                       for i in self.session.get_inputs()]
        self.outputs = [{"name": o.name, "shape": list(o.shape), "dtype": _ort_dtype(o.type)}
                        for o in self.session.get_outputs()]
        self.classifier = False
        self.labels = None
        self.runtime = f"onnxruntime {_ort_version()} CPU, {threads} threads"

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o["name"] for o in self.outputs]
        missing = [d["name"] for d in self.inputs if d["name"] not in inputs]
        if missing:
            raise EdgeExportError(f"{self.path.name} takes input '{missing[0]}'; it was not given")
        feeds = {d["name"]: np.ascontiguousarray(inputs[d["name"]], dtype=np.float32) for d in self.inputs}
        try:
            return dict(zip(names, self.session.run(names, feeds)))
        except Exception as e:  # onnxruntime's own types: wrong shape or rank for this model
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
            raise EdgeExportError(f"onnxruntime cannot run {self.path.name} on {shapes}: {first_line(e)[:200]}") from None

    numeric = __call__   # every output of our ONNX files is a number PyTorch computes too


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _ort_dtype(t: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
            "tensor(uint8)": "uint8", "tensor(int8)": "int8"}.get(t, t)


def load(path: Path, threads: int = 2) -> OnnxRunner:
    return OnnxRunner(path, threads)


def describe(path: Path) -> dict:
    """Op counts, the largest tensor rank and whether every shape is static (after shape inference)."""
    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    ranks, dynamic = [], []
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if not t.HasField("shape"):
            continue
        ranks.append(len(t.shape.dim))
        if any(not d.HasField("dim_value") for d in t.shape.dim):
            dynamic.append(v.name)
    dtypes = sorted({_DTYPES.get(i.data_type, str(i.data_type)) for i in g.initializer})
    return {"ops": _op_counts(model), "nodes": len(model.graph.node), "max_rank": max(ranks, default=0),
            "dynamic": dynamic, "weight_dtypes": dtypes, **_io(model)}


def structure(facts: dict, options: dict) -> dict:
    problems = []
    if facts["dynamic"]:
        problems.append(f"{len(facts['dynamic'])} tensors with dynamic shape (first: {facts['dynamic'][0]})")
    summary = "; ".join(problems) or (f"{facts['nodes']} nodes, max rank {facts['max_rank']}, all shapes static, "
                                      f"weights {'/'.join(facts['weight_dtypes']) or 'none'}")
    return {"passed": not problems, "max_rank": facts["max_rank"], "summary": summary}


def gate(options: dict, trained: bool) -> Gate:
    return Gate(TOLERANCE)


def report(program: torch.export.ExportedProgram, example: torch.Tensor) -> dict:
    """For ``inspect --format onnx``: how ORT Mobile's usability checker partitions the ONNX of
    ``program`` for the CoreML (ML Program) and NNAPI execution providers."""
    import tempfile

    from ..ort_mobile import partitions

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        convert(program, example, path, {"opset": 18})
        eps = partitions(path)
    rows = {}
    for key, title in (("coreml_mlprogram", "CoreML EP (ML Program)"), ("nnapi", "NNAPI EP")):
        ep = eps[key]
        rows[f"{title} partitions"] = ep["partitions"]
        rows[f"{title} unsupported ops"] = ", ".join(f"{k} {v}" for k, v in ep["unsupported_ops"].items()) or "none"
    return {"title": "ORT Mobile partitions (onnxruntime's usability checker)", "rows": rows, "detail": eps}
