"""Core ML: the rewritten ExportedProgram → an ML Program ``.mlpackage`` for Xcode, run here by
the reference runner (``coreml_runner/``: the saved program, op by op, with torch kernels).

Input: by default an RGB image (0–255, what a CVPixelBuffer holds) with ImageNet normalisation
done exactly inside the graph by the ``normalize_input`` pass (Core ML's ImageType has a single
scale, so per-channel std cannot live there); ``--tensor-input`` gives a float tensor ``images``.
Output: a classifier (class label + probabilities) for 1000-class models with the ImageNet-1k
names, ``--labels`` for other heads, or raw ``logits``. The program is captured with logits; the
classifier's softmax is appended at conversion.

Checks: structural — every tensor in the saved program has rank ≤ 5 and a static shape, inputs
and outputs are what the flags asked for; numeric — the saved package through the reference runner
against PyTorch (classifiers on the logits that feed the softmax: probabilities saturate). An fp32
program is held to 1e-4 of the output's scale; an fp16 program to 2e-2 and cosine 0.999, gated only
when real weights were given (on a random network it is measured and recorded, not enforced).

Sampling coordinates stay fp32 in an fp16 program: a ``resample`` (``grid_sample``) and every op
whose results only feed its coordinates (LITv2's deformable sampling grid) compute in fp32, because
fp16 cannot place a sample to sub-pixel precision on large maps (its spacing is 0.25 px between 256
and 512). The runner executes the dtypes the program declares, so the check measures that too.

The format contract (see ``exporters/__init__.py``): ``validate_options``, ``convert``, ``load``,
``describe``, ``structure``, ``gate``.
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..quiet import silenced
from .. import __version__
from ..errors import EdgeExportError, first_line
from ..labels import imagenet_labels
from .check import Gate

TARGETS = ("iOS16", "iOS17", "iOS18")
PRECISIONS = ("fp16", "fp32")
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2       # max error relative to the output's scale, fp16 package in the runner
FP16_MIN_COSINE = 0.999
IMAGE_INPUT = "image"
TENSOR_INPUT = "images"


def _ct():
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with silenced():
        import coremltools as ct
    return ct


def validate_options(*, target: str = "iOS16", precision: str = "fp16", labels=None, output=None,
                     tensor_input: bool = False, logits: bool = False, features: bool = False, **_ignored) -> dict:
    """Check Core ML flags before any work is done (bad input → EdgeExportError)."""
    if target not in TARGETS:
        raise EdgeExportError(f"unknown --target '{target}'; use one of: {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise EdgeExportError(f"unknown --precision '{precision}'; use fp16 or fp32")
    if output is not None and Path(output).suffix != ".mlpackage":
        raise EdgeExportError(f"Core ML output path must end in .mlpackage, got '{output}'")
    # labels: the class names api.export read from --labels (or None)
    return {"target": target, "precision": precision, "labels": labels, "tensor_input": tensor_input,
            "logits": logits or features, "features": features}


def class_labels(num_classes: int, given: list[str] | None, source: str = "--labels") -> list[str]:
    if given is not None:
        if len(given) != num_classes:
            raise EdgeExportError(f"{source} has {len(given)} names but the model has {num_classes} classes; "
                                  "give exactly one name per class, one per line")
        return given
    if num_classes == 1000:
        return imagenet_labels()
    return [str(i) for i in range(num_classes)]


def convert(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path, options: dict,
            meta) -> dict:
    """Convert and save; returns the backend facts (with ``io``) for the manifest."""
    ct = _ct()
    tensor_input, logits, precision, target = (options["tensor_input"], options["logits"], options["precision"],
                                               options["target"])
    shape = tuple(example.shape)
    if tensor_input:
        inputs = [ct.TensorType(name=TENSOR_INPUT, shape=shape, dtype=np.float32)]
    else:
        inputs = [ct.ImageType(name=IMAGE_INPUT, shape=shape, color_layout=ct.colorlayout.RGB, scale=1.0,
                               bias=[0.0, 0.0, 0.0])]
    kwargs = {}
    names = None
    program = program.run_decompositions({})
    if not logits:
        names = class_labels(meta.num_classes, options["labels"])
        kwargs["classifier_config"] = ct.ClassifierConfig(names)
        _append_softmax(program)
    else:
        kwargs["outputs"] = [ct.TensorType(name=n) for n in meta.output_names or ["logits"]]
    fp32_ops: dict[int, set[int]] = {}

    def fp16_selector(op) -> bool:
        block = op.enclosing_block
        if id(block) not in fp32_ops:  # first call per block: the graph is still as converted
            fp32_ops[id(block)] = {id(o) for o in coordinate_ops(
                list(block.operations), is_sampler=lambda o: o.op_type == "resample",
                coordinate_input=lambda o: o.coordinates,
                consumers=lambda o: [(c, v) for v in o.outputs for c in v.child_ops],
                is_output=lambda o: any(v in block.outputs for v in o.outputs))}
        return id(op) not in fp32_ops[id(block)]

    compute = (ct.transform.FP16ComputePrecision(op_selector=fp16_selector) if precision == "fp16"
               else ct.precision.FLOAT32)
    with silenced():
        ml = ct.convert(program, inputs=inputs, convert_to="mlprogram",
                        minimum_deployment_target=getattr(ct.target, target),
                        compute_precision=compute, **kwargs)
    h, w = meta.res
    norm = (f"RGB 0–255; mean {tuple(meta.mean)} / std {tuple(meta.std)} applied inside the model"
            if not tensor_input else f"float N×3×{h}×{w}, already normalised with mean {tuple(meta.mean)} "
                                     f"/ std {tuple(meta.std)}")
    task = (f"backbone ({', '.join(meta.output_names)})" if meta.features else "image classification")
    ml.short_description = (f"{meta.model} — {meta.paper}; {task} at {h}×{w}; "
                            f"exported by edgevit-export {__version__}")
    ml.author = f"edgevit-export {__version__} (model: {meta.paper})"
    ml.license = "See the license of the weights you exported; edgevit-export code: MIT"
    ml.version = __version__
    ml.user_defined_metadata.update({
        "model": meta.model, "family": meta.family, "resolution": f"{h}x{w}", "params": str(meta.params),
        "normalization": norm, "precision": precision, "target": target, "passes": ",".join(meta.passes),
        "edgevit_export.version": __version__})
    if meta.preprocess:
        ml.user_defined_metadata["preprocess"] = meta.preprocess
    in_name = TENSOR_INPUT if tensor_input else IMAGE_INPUT
    ml.input_description[in_name] = norm
    spec = ml.get_spec()
    if meta.features:   # the shapes the converted program declares (a padding family floors, others round up)
        shapes = {o.name: list(o.type.multiArrayType.shape) for o in spec.description.output}
        for f in meta.features:
            dims = "×".join(["N", *(str(d) for d in shapes[f.name][1:])])
            ml.output_description[f.name] = (f"feature map, stride {f.stride}: {dims} "
                                             f"(output of {f.module}{', ' + f.norm if f.norm else ''})")
    elif logits:
        ml.output_description["logits"] = f"raw logits, {meta.num_classes} classes (apply softmax for probabilities)"
    else:
        ml.output_description[spec.description.predictedFeatureName] = "most likely class"
        ml.output_description[spec.description.predictedProbabilitiesName] = "probability per class (softmax)"
    ml.save(str(path))
    io_desc = {"inputs": [{"name": in_name, "kind": "tensor" if tensor_input else "image", "shape": list(shape),
                           "description": norm}],
               "outputs": [_output_io(o, meta.num_classes) for o in spec.description.output],
               "classifier": not logits, "num_classes": meta.num_classes}
    return {"target": target, "precision": precision, "coremltools": ct.__version__,
            "labels": None if logits else ("names" if options["labels"] else "indices"), "io": io_desc}


def _output_io(o, num_classes: int) -> dict:
    """An output of the package's description: name, dtype and (for arrays) shape."""
    kind = o.type.WhichOneof("Type")
    if kind == "multiArrayType":
        t = o.type.multiArrayType
        kind_name = type(t).ArrayDataType.Name(t.dataType)      # FLOAT32, FLOAT16, DOUBLE, INT32, INT8
        dtype = "float64" if kind_name == "DOUBLE" else kind_name.lower()
        return {"name": o.name, "shape": [int(d) for d in t.shape], "dtype": dtype, "kind": "tensor"}
    if kind == "stringType":
        return {"name": o.name, "dtype": "string", "kind": "label"}
    if kind == "dictionaryType":
        return {"name": o.name, "dtype": "dict[string, float64]", "shape": [num_classes], "kind": "probabilities"}
    return {"name": o.name, "dtype": kind}


def _append_softmax(program: torch.export.ExportedProgram) -> None:
    """Logits → probabilities over the last axis, appended to the program's graph: a classifier
    reports probabilities, and the checks read the logits before this op."""
    g = program.graph_module.graph
    out = next(n for n in g.nodes if n.op == "output")
    (last,) = out.args[0]
    with g.inserting_before(out):
        sm = g.call_function(torch.ops.aten._softmax.default, (last, -1, False))
    sm.meta["val"] = torch.softmax(last.meta["val"], -1)
    out.args = ((sm,),)
    program.graph_signature.output_specs[0].arg.name = sm.name
    program.graph_module.recompile()


def load(path: Path):
    """The reference runner (Linux and macOS alike: one executor, so figures agree everywhere)."""
    from .coreml_runner import CoreMLRunner

    return CoreMLRunner(path)


def describe(path: Path) -> dict:
    return inspect_program(path)


def structure(facts: dict, options: dict) -> dict:
    """The saved program has rank ≤ 5, static shapes, and the input/output kinds the flags asked for."""
    problems = []
    if facts["high_rank"]:
        problems.append(f"{len(facts['high_rank'])} tensors of rank > 5 (first: {facts['high_rank'][0]})")
    if facts["dynamic"]:
        problems.append(f"{len(facts['dynamic'])} tensors with dynamic shape (first: {facts['dynamic'][0]})")
    want_in = "multiArrayType" if options["tensor_input"] else "imageType"
    if facts["inputs"][0][1] != want_in:
        problems.append(f"input is {facts['inputs'][0][1]}, expected {want_in}")
    if facts["classifier"] == options["logits"]:   # --features sets logits: tensor outputs, no classifier
        problems.append("classifier output missing" if not options["logits"] else "expected raw logits, got a classifier")
    mixed = ""
    fp16 = options["precision"] == "fp16"
    if fp16 and facts["fp32_ops"]:
        n32 = sum(facts["fp32_ops"].values())
        mixed = f", {n32} ops kept fp32 (sampling coordinates: {facts['fp32_ops'].get('resample', 0)} resample)"
    return {"passed": not problems, "max_rank": facts["max_rank"], "ops": facts["ops"],
            "fp32_ops": facts["fp32_ops"] if fp16 else None, "inputs": facts["inputs"], "outputs": facts["outputs"],
            "summary": "; ".join(problems) if problems else
            f"{sum(facts['ops'].values())} ops, max rank {facts['max_rank']}, all shapes static, "
            f"input {facts['inputs'][0][1]}, " + ("classifier output" if facts["classifier"] else
            f"{len(facts['outputs'])} feature outputs" if options.get("features") else "logits output") + mixed}


RANDOM_WEIGHTS_FP16 = ("not gated: random weights — how far fp16 rounding moves a randomly initialised network "
                       "says little about how far it moves your trained one; export with --weights for a gated "
                       "fp16 check")


def gate(options: dict, trained: bool) -> Gate:
    if options["precision"] == "fp32":
        return Gate(FP32_TOLERANCE)
    return Gate(FP16_TOLERANCE, FP16_MIN_COSINE, gated=trained, note="" if trained else RANDOM_WEIGHTS_FP16)


def inspect_program(path: Path) -> dict:
    """Walk the saved ML Program: op inventory, max rank, tensors of rank > 5 or dynamic shape."""
    ct = _ct()
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    from coremltools.proto import MIL_pb2

    ops: collections.Counter = collections.Counter()
    fp32: collections.Counter = collections.Counter()
    max_rank, high, dynamic = 0, [], []

    def walk(block):
        nonlocal max_rank
        for op in block.operations:
            ops[op.type] += 1
            for out in op.outputs:
                t = out.type
                if t.WhichOneof("type") != "tensorType":
                    continue
                rank = t.tensorType.rank
                max_rank = max(max_rank, rank)
                if t.tensorType.dataType == MIL_pb2.FLOAT32 and op.type not in ("const", "cast"):
                    fp32[op.type] += 1
                if rank > 5:
                    high.append(f"{out.name} (rank {rank}, op {op.type})")
                if any(d.WhichOneof("dimension") != "constant" for d in t.tensorType.dimensions):
                    dynamic.append(out.name)
            for b in op.blocks:
                walk(b)

    for fn in spec.mlProgram.functions.values():
        for blk in fn.block_specializations.values():
            walk(blk)
    d = spec.description
    return {"ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))), "max_rank": max_rank,
            "fp32_ops": dict(fp32), "high_rank": high, "dynamic": dynamic,
            "inputs": [(i.name, i.type.WhichOneof("Type")) for i in d.input],
            "outputs": [(o.name, o.type.WhichOneof("Type")) for o in d.output],
            "classifier": bool(d.predictedFeatureName)}


def coordinate_ops(ops: list, *, is_sampler, coordinate_input, consumers, is_output) -> list:
    """The ops (in a topologically ordered list) that stay fp32 in an fp16 program: every sampler
    (``resample`` / ``grid_sampler``) and every op whose results are used only, directly or through
    other such ops, as a sampler's coordinates. Works on MIL ops and on fx nodes alike through the
    four accessors; ``consumers(op)`` yields ``(user, value_used)`` pairs."""
    keep: set[int] = set()
    for op in reversed(ops):
        if is_sampler(op):
            keep.add(id(op))
            continue
        users = consumers(op)
        if users and not is_output(op) and all(
                (is_sampler(u) and v is coordinate_input(u)) or (id(u) in keep and not is_sampler(u)) for u, v in users):
            keep.add(id(op))
    return [op for op in ops if id(op) in keep]




# --- inspect: what the ML Program is made of -------------------------------------------------------

NORM_PRIMITIVES = ("reduce_mean", "sub", "square", "sqrt", "real_div", "batch_norm", "instance_norm", "layer_norm")


def report(program: torch.export.ExportedProgram, example: torch.Tensor) -> dict:
    """For ``inspect --format coreml``: the non-const ops of the ML Program ``program`` converts to
    (coremltools' MIL after its default passes, iOS16, tensor in), by type."""
    ct = _ct()
    title = "Core ML program (coremltools MIL, iOS16)"
    try:
        with silenced():
            mil = ct.convert(program.run_decompositions({}), convert_to="milinternal",
                             inputs=[ct.TensorType(name=TENSOR_INPUT, shape=tuple(example.shape), dtype=np.float32)],
                             minimum_deployment_target=ct.target.iOS16, compute_precision=ct.precision.FLOAT32)
    except Exception as e:   # e.g. rank-6 tensors before the passes: say so, it is the finding
        return {"title": title, "rows": {"Core ML conversion": f"fails: {first_line(e)[:160]}"}, "detail": {}}
    counts: collections.Counter = collections.Counter()

    def walk(ops):
        for op in ops:
            if op.op_type != "const":
                counts[op.op_type] += 1
            for blk in op.blocks:
                walk(blk.operations)

    for fn in mil.functions.values():
        walk(fn.operations)
    ops = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    norm = {k: ops[k] for k in NORM_PRIMITIVES if k in ops}
    rows = {"non-const ops": sum(ops.values()),
            "op types": ", ".join(f"{k} {v}" for k, v in list(ops.items())[:8]) + (f", +{len(ops) - 8} more" if len(ops) > 8 else ""),
            "norm-related ops": ", ".join(f"{k} {v}" for k, v in norm.items()) or "none"}
    return {"title": title, "rows": rows, "detail": {"ops": ops}}
