"""ONNX backend: the rewritten ExportedProgram → a static-shape ONNX model, simplified."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx
import torch

from ..errors import EdgeExportError

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def to_onnx(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path, *,
            opset: int = 18, simplify: bool = True) -> dict:
    """Write ``program`` as ONNX to ``path``; returns facts for the manifest."""
    if opset < 17:
        raise EdgeExportError(f"--opset {opset} is too old; use 17 or newer (default 18)")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        onnx_program = torch.onnx.export(
            program, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], optimize=True, verbose=False)
    model = onnx_program.model_proto
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
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"opset": opset, "simplified": simplified, "note": note, "nodes": len(model.graph.node),
            "ops": _op_counts(model)}


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def ort_session(path_or_bytes, threads: int = 2, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
