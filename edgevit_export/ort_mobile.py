"""How onnxruntime's mobile usability checker partitions an ONNX graph for the phone EPs.

This is the analysis behind ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``
(module ``onnxruntime.tools.mobile_helpers.usability_checker``), called in-process and quietly,
with its numbers returned instead of logged. Like that tool, the model is first optimised by
onnxruntime at the BASIC level (what an ORT-format conversion does), shape-inferred in strict mode,
then checked with ``require_fixed_input_sizes=True`` against the supported-op lists shipped with
onnxruntime: ``coreml_supported_mlprogram_ops.md``, ``coreml_supported_neuralnetwork_ops.md``
(both with CoreML's rank ≤ 5 limit) and ``nnapi_supported_ops.md``.

The checker is an estimate: it replicates onnxruntime's partitioning from op type, rank and
static shape only; the per-op caveats in those lists (e.g. "only 2D Conv") are not checked.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from .quiet import silenced
from .errors import EdgeExportError, first_line

# our key → the supported-op list in onnxruntime/tools/mobile_helpers/ (None: NNAPI's own function)
EPS = {
    "coreml_mlprogram": "coreml_supported_mlprogram_ops.md",
    "coreml_neuralnetwork": "coreml_supported_neuralnetwork_ops.md",
    "nnapi": None,
}


@contextlib.contextmanager
def _quiet():
    """No Python-level output (stdout, stderr, logging) from onnxruntime's helpers."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with silenced():
            yield
    finally:
        logging.disable(previous)


def _op_name(domain_op: str) -> str:
    """``ai.onnx:Erf`` → ``Erf``; other domains keep theirs (``com.microsoft:FusedConv``)."""
    return domain_op.split(":", 1)[1] if domain_op.startswith("ai.onnx:") else domain_op


def _all_nodes(graph):
    """Nodes of a graph and of its subgraphs (If/Loop/Scan bodies): what the checker counts."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):  # the checker descends into single-graph attributes only
                yield from _all_nodes(attr.g)


def _summary(info, graph) -> dict:
    """A ``usability_checker.PartitioningInfo`` as a plain dict. The checker keeps the unsupported
    op types as a set; the per-op counts are the nodes of those types in the checked graph."""
    counts: dict[str, int] = {}
    for node in _all_nodes(graph):
        key = f"{node.domain or 'ai.onnx'}:{node.op_type}"
        if key in info.unsupported_ops:
            name = _op_name(key)
            counts[name] = counts.get(name, 0) + 1
    return {
        "partitions": int(info.num_partitions),
        "nodes": int(info.num_nodes),
        "supported_nodes": int(info.num_supported_nodes),
        "unsupported_ops": dict(sorted(counts.items())),
        "one_partition": info.num_partitions == 1,
    }


def _with_shapes(path: Path, tmp: Path):
    """The model with strict ONNX shape inference run: what ``onnx_model_utils.ModelProtoWithShapeInfo``
    gives the checker, without that class's destructor writing to stderr when loading fails."""
    import onnx

    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    if len(model.graph.node) > 0 and len(inferred.graph.node) == 0:  # > 2 GB: infer_shapes fails silently
        out = tmp / "with_shapes.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(out), strict_mode=True)
        inferred = onnx.load(str(out))
    return inferred


def partitions(onnx_path: str | Path, *, optimize: bool = True) -> dict:
    """How onnxruntime's mobile usability checker partitions ``onnx_path`` for each phone EP.

    Returns ``{"coreml_mlprogram": EP, "coreml_neuralnetwork": EP, "nnapi": EP}``, each EP a dict
    ``{"partitions": int, "nodes": int, "supported_nodes": int, "unsupported_ops": {op_type: count},
    "one_partition": bool}``. onnxruntime 1.32's checker distinguishes Core ML's ML Program and
    NeuralNetwork formats (one supported-op list each), hence two CoreML keys.

    ``partitions``: the groups of supported nodes the EP would take (each a CPU↔EP hand-over;
    0 means the EP runs nothing). ``nodes``: nodes in the graph the checker saw (after BASIC
    optimisation unless ``optimize=False``, subgraph nodes included). ``supported_nodes``: those in
    a partition; a node can also be left out for a dynamic input shape or (CoreML) rank > 5, so
    ``nodes - supported_nodes`` may exceed the sum of ``unsupported_ops``. ``unsupported_ops``:
    op types the EP's list lacks, with how many nodes have them (``ai.onnx`` ops by bare name,
    others as ``domain:op``). ``one_partition``: ``partitions == 1``.

    ``optimize``: optimise at onnxruntime's BASIC level first, as the command-line checker does;
    False checks the graph exactly as written. Prints nothing. A missing or unreadable file is an
    :class:`EdgeExportError`.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise EdgeExportError(f"no ONNX file at {path}: pass the path of an .onnx file.")

    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import optimize_model

    with _quiet(), tempfile.TemporaryDirectory(prefix="edgevit-ort-mobile-") as tmp:
        checked = path
        if optimize:
            checked = Path(tmp) / "model.onnx"
            try:
                # external initializers as the checker does: also handles models over 2 GB
                optimize_model(path, checked, use_external_initializers=True)
            except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeError types
                raise EdgeExportError(f"onnxruntime cannot load {path}: {first_line(e)[:300]}") from None
        try:
            model = _with_shapes(checked, Path(tmp))
        except Exception as e:  # DecodeError, ValidationError, InferenceError, OSError
            raise EdgeExportError(f"cannot read {path} as an ONNX model: {first_line(e)[:300]}") from None

        result = {}
        for key, config in EPS.items():
            try:
                if config is None:
                    info = uc.check_nnapi_partitions(model, require_fixed_input_sizes=True)
                else:
                    info = uc.check_coreml_partitions(model, require_fixed_input_sizes=True,
                                                      config_filename=config)
            except ValueError as e:  # no shape information after inference
                raise EdgeExportError(f"cannot check {path} for {key}: {first_line(e)[:300]}") from None
            result[key] = _summary(info, model.graph)
    return result
