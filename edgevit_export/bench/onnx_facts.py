"""Facts read from an ONNX file without running it: its image input, its multiply-accumulates, and
the manifest ``edgevit-export export`` wrote beside it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeExportError


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


def sibling_manifest(path: Path, manifest_path: Path | None = None) -> dict | None:
    """The manifest 'edgevit-export export' writes beside a file, if it belongs to this very file."""
    from ..exporters.artifacts import sha256

    mp = manifest_path or path.with_suffix(".json")
    try:
        manifest = json.loads(mp.read_text())
        if manifest.get("sha256") == sha256(path):
            return manifest
    except (OSError, ValueError, AttributeError):
        pass
    return None
