"""What ``quantize`` and ``evaluate`` are given: a zoo model name or a float .onnx file, resolved to
its input resolution, preprocessing and number of classes, with a one-line error for anything
that cannot be quantized or evaluated here.

Preprocessing: a model name gets its own eval transform (``ModelInfo``: crop_pct, interpolation,
mean/std); an .onnx file exported by this tool gets the one its manifest records ("preprocess",
"normalization"); ``--crop-pct``/``--interpolation``/``--mean``/``--std`` (a
:class:`~.data.PreprocessOverrides`) change either, except mean/std of a graph that normalises inside."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeExportError, ResolutionError
from .data import Preprocess, PreprocessOverrides


@dataclass
class Target:
    kind: str                     # "model" | "onnx"
    name: str                     # model name, or the file's stem
    path: Path | None
    hw: tuple[int, int]
    preprocess: Preprocess
    num_classes: int
    float_manifest: dict | None = None
    note: str = ""

    @property
    def head(self) -> str:
        """What predicts the classes, for messages about class counts."""
        return f"{self.name}'s head" if self.kind == "model" else self.path.name


def _onnx_io(path: Path):
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise EdgeExportError(f"cannot read ONNX file {path} ({type(e).__name__}); pass a valid .onnx") from None
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise EdgeExportError(f"{path} has {len(inputs)} inputs; quantize takes image classifiers with one input")

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]

    ops = {n.op_type for n in m.graph.node}
    return dims(inputs[0]), [dims(o) for o in m.graph.output], ops


def resolve_target(model: str, res, weights: str | None, purpose: str = "quantize",
                   preprocess: PreprocessOverrides | None = None) -> Target:
    """A model name or an .onnx file → what to quantize, its resolution, preprocessing (with the
    user's ``preprocess`` overrides applied), classes."""
    p = Path(model).expanduser()
    if model.endswith(".mlpackage") or model.endswith(".mlmodel"):
        if purpose == "evaluate":
            raise EdgeExportError(f"{model}: evaluate reads ONNX files and model names; evaluate the model name "
                                  "(PyTorch, with --weights) or its ONNX export, or run the package with "
                                  "'edgevit-export run' / 'edgevit-export check'")
        raise EdgeExportError(f"{model}: Core ML packages cannot be re-quantized here; pass the model name with "
                              "--format coreml (and --weights) to compress its weights")
    if model.endswith(".onnx") or p.is_file():
        return _onnx_target(p, res, weights, purpose, preprocess)
    return _model_target(model, res, weights, preprocess)


def _onnx_target(p: Path, res, weights: str | None, purpose: str,
                 overrides: PreprocessOverrides | None = None) -> Target:
    if not p.is_file():
        raise EdgeExportError(f"ONNX file not found: {p}")
    if weights is not None:
        raise EdgeExportError("--weights applies to model names; an .onnx file already holds its weights")
    in_dims, out_dims, ops = _onnx_io(p)
    if purpose == "quantize" and {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger"} & ops:
        raise EdgeExportError(f"{p} is already quantized; pass the float model (or its name)")
    if len(in_dims) != 4 or not all(isinstance(d, int) and d > 0 for d in in_dims[1:]) or in_dims[1] != 3:
        raise EdgeExportError(f"{p} takes input of shape {in_dims}; quantize needs a static N×3×H×W image "
                              "input (export with edgevit-export export)")
    hw = (in_dims[2], in_dims[3])
    if res is not None:
        want = _parse_res_loose(res)
        if want != hw:
            raise ResolutionError(f"{p} takes {hw[0]}x{hw[1]} inputs, not {want[0]}x{want[1]}; "
                                  "drop --res or export the model at that resolution")
    if len(out_dims) > 1 or (out_dims and len(out_dims[0]) == 4):
        raise EdgeExportError(f"{p.name} outputs {len(out_dims)} feature map(s), not class scores (a --features "
                              f"backbone export); {purpose} measures a classifier's accuracy: pass the classifier "
                              "(export without --features) or the model name")
    ncls = out_dims[0][-1] if out_dims and out_dims[0] and isinstance(out_dims[0][-1], int) else None
    if ncls is None:
        raise EdgeExportError(f"{p} has no static class dimension on its output; export it with a fixed head")
    manifest = None
    mpath = p.with_suffix(".json")
    if mpath.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            manifest = json.loads(mpath.read_text())
    note, raw = "", None
    if manifest and isinstance(manifest.get("normalization"), dict):
        nm = manifest["normalization"]
        if nm.get("in_graph"):
            rng = str(nm.get("input_range", "0-255"))
            raw = float(rng.split("-")[-1]) if "-" in rng else 255.0
            if overrides is not None and overrides.normalization:
                raise EdgeExportError(f"{p.name} normalises inside its graph (mean {nm.get('mean')} std "
                                      f"{nm.get('std')}, its manifest says); --mean/--std cannot change that: "
                                      "re-export it with --mean/--std")
    else:
        assumed = [w for w, given in (("ImageNet mean/std normalisation", overrides and overrides.normalization),
                                      ("crop_pct 0.875", overrides and overrides.crop_pct is not None),
                                      ("bicubic resizing", overrides and overrides.interpolation))
                   if not given]
        note = (f"no manifest beside {p.name}: assuming {', '.join(assumed)} "
                "(export with edgevit-export to record it, or pass --crop-pct/--interpolation/--mean/--std)"
                if assumed else "")
    pre = Preprocess.from_manifest(manifest, hw, raw_scale=raw, overrides=overrides)
    return Target("onnx", p.stem, p, hw, pre, int(ncls), manifest, note)


def _model_target(model: str, res, weights: str | None, overrides: PreprocessOverrides | None = None) -> Target:
    from ..memory import check_fits
    from ..registry import create_model, get_model_info, parse_resolution

    info = get_model_info(model)             # UnknownModelError for a bad name
    model = info.name                        # any case, dashes, a timm tag → the zoo's name
    hw = parse_resolution(res, info)
    check_fits(model, info, hw, 1, "quantize")
    net = create_model(model, weights=weights)   # WeightsError for a bad checkpoint
    ncls = getattr(net, "num_classes", None)
    if not isinstance(ncls, int) or ncls <= 0:
        import torch

        with torch.no_grad():
            ncls = int(net(torch.zeros(1, 3, *hw)).shape[-1])
    return Target("model", model, None, hw, Preprocess.of_model(info, hw, overrides), ncls)


def _parse_res_loose(res) -> tuple[int, int]:
    if isinstance(res, (tuple, list)):
        return int(res[0]), int(res[1])
    try:
        parts = [int(v) for v in str(res).lower().split("x")]
    except ValueError:
        raise ResolutionError(f"resolution '{res}' is not a number; use e.g. 224 or 768x1024") from None
    return parts[0], parts[-1]



def random_weights(target: Target, opts) -> bool:
    """A zoo model without --weights, or an .onnx whose manifest says it was exported so."""
    if target.kind == "model":
        return opts.weights is None
    return bool((target.float_manifest or {}).get("random_init"))


def random_init_note(name: str) -> str:
    return f"no --weights: {name} is randomly initialised; its accuracy means nothing"
