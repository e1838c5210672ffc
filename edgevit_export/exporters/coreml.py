"""Core ML backend: the rewritten ExportedProgram → an ML Program ``.mlpackage`` for Xcode.

Input: by default an RGB image (0–255, what a CVPixelBuffer holds) with ImageNet normalisation
done exactly inside the graph by the ``normalize_input`` pass (Core ML's ImageType has a single
scale, so per-channel std cannot live there); ``--tensor-input`` gives a float tensor ``images``.
Output: a classifier (class label + probabilities) for 1000-class models with the ImageNet-1k
names, ``--labels`` for other heads, or raw ``logits``.

Checks (Core ML cannot run on Linux): structural — every tensor in the saved program has rank
≤ 5 and a static shape, inputs/outputs are what the flags asked for; numeric — the exact torch
program handed to coremltools against the original model in fp32 and with fp16 emulated (the
program run in half precision), since mlprogram computes in fp16 by default. Classifiers are
compared on their logits (probabilities saturate). The fp16 comparison gates the export only when
real weights were given: on a random network it is measured and recorded, not enforced.

Sampling coordinates stay fp32 in an fp16 program: a ``resample`` (``grid_sample``) and every op
whose results only feed its coordinates (LITv2's deformable sampling grid) compute in fp32, because
fp16 cannot place a sample to sub-pixel precision on large maps (its spacing is 0.25 px between 256
and 512). The fp16 emulation applies the same rule, so the check measures the program we ship.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import EdgeExportError

TARGETS = ("iOS16", "iOS17", "iOS18")
PRECISIONS = ("fp16", "fp32")
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2       # max error relative to the output's scale, fp16 emulated
FP16_MIN_COSINE = 0.999
IMAGE_INPUT = "image"
TENSOR_INPUT = "images"


def _ct():
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import coremltools as ct
    return ct


def imagenet_labels() -> list[str]:
    text = resources.files("edgevit_export").joinpath("data/imagenet1k_classes.txt").read_text()
    return text.splitlines()


def validate_options(*, target: str, precision: str, labels, output) -> dict:
    """Check Core ML flags before any work is done (bad input → EdgeExportError)."""
    if target not in TARGETS:
        raise EdgeExportError(f"unknown --target '{target}'; use one of: {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise EdgeExportError(f"unknown --precision '{precision}'; use fp16 or fp32")
    if output is not None and Path(output).suffix != ".mlpackage":
        raise EdgeExportError(f"Core ML output path must end in .mlpackage, got '{output}'")
    names = None
    if labels is not None:
        p = Path(labels)
        if not p.is_file():
            raise EdgeExportError(f"--labels file not found: {p}")
        try:
            names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise EdgeExportError(f"--labels file {p} is not UTF-8 text; give one class name per line") from None
        if not names:
            raise EdgeExportError(f"--labels file {p} is empty; give one class name per line")
    return {"target": target, "precision": precision, "labels": names}


def class_labels(num_classes: int, given: list[str] | None, source: str = "--labels") -> list[str]:
    if given is not None:
        if len(given) != num_classes:
            raise EdgeExportError(f"{source} has {len(given)} names but the model has {num_classes} classes; "
                                  "give exactly one name per class, one per line")
        return given
    if num_classes == 1000:
        return imagenet_labels()
    return [str(i) for i in range(num_classes)]


def to_coreml(pipe, path: Path, *, info, model_name: str, res, tensor_input: bool, logits: bool, params: int,
              target: str, precision: str, labels: list[str] | None, num_classes: int) -> tuple[dict, dict]:
    """Convert and save; returns (backend facts, io description) for the manifest."""
    ct = _ct()
    example = pipe.example_input
    shape = tuple(example.shape)
    if tensor_input:
        inputs = [ct.TensorType(name=TENSOR_INPUT, shape=shape, dtype=np.float32)]
    else:
        inputs = [ct.ImageType(name=IMAGE_INPUT, shape=shape, color_layout=ct.colorlayout.RGB, scale=1.0,
                               bias=[0.0, 0.0, 0.0])]
    kwargs = {}
    names = None
    if not logits:
        names = class_labels(num_classes, labels)
        kwargs["classifier_config"] = ct.ClassifierConfig(names)
    else:
        kwargs["outputs"] = [ct.TensorType(name="logits")]
    program = pipe.program.run_decompositions({})
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
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        ml = ct.convert(program, inputs=inputs, convert_to="mlprogram",
                        minimum_deployment_target=getattr(ct.target, target),
                        compute_precision=compute, **kwargs)
    h, w = res
    norm = (f"RGB 0–255; ImageNet mean {tuple(info.mean)} / std {tuple(info.std)} applied inside the model"
            if not tensor_input else f"float N×3×{h}×{w}, already normalised with mean {tuple(info.mean)} "
                                     f"/ std {tuple(info.std)}")
    ml.short_description = (f"{model_name} — {info.paper}; image classification at {h}×{w}; "
                            f"exported by edgevit-export {__version__}")
    ml.author = f"edgevit-export {__version__} (model: {info.paper})"
    ml.license = "See the license of the weights you exported; edgevit-export code: MIT"
    ml.version = __version__
    meta = ml.user_defined_metadata
    meta.update({"model": model_name, "family": info.family, "resolution": f"{h}x{w}", "params": str(params),
                 "normalization": norm, "precision": precision, "target": target,
                 "passes": ",".join(p.name for p in pipe.passes), "edgevit_export.version": __version__})
    in_name = TENSOR_INPUT if tensor_input else IMAGE_INPUT
    ml.input_description[in_name] = norm
    spec = ml.get_spec()
    out_names = [o.name for o in spec.description.output]
    if logits:
        ml.output_description["logits"] = f"raw logits, {num_classes} classes (apply softmax for probabilities)"
    else:
        ml.output_description[spec.description.predictedFeatureName] = "most likely class"
        ml.output_description[spec.description.predictedProbabilitiesName] = "probability per class (softmax)"
    ml.save(str(path))
    io_desc = {"inputs": [{"name": in_name, "kind": "tensor" if tensor_input else "image", "shape": list(shape),
                           "description": norm}],
               "outputs": [{"name": n} for n in out_names],
               "classifier": not logits, "num_classes": num_classes}
    return {"target": target, "precision": precision, "coremltools": ct.__version__,
            "labels": "given" if labels else ("imagenet-1k" if names and num_classes == 1000 else
                                              ("indices" if names else None))}, io_desc


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


def _fx_coordinate_nodes(gm: torch.fx.GraphModule) -> set[str]:
    nodes = list(gm.graph.nodes)
    keep = coordinate_ops(
        nodes, is_sampler=lambda n: n.op == "call_function" and "grid_sampler" in str(n.target),
        coordinate_input=lambda n: n.args[1],
        consumers=lambda n: [(u, n) for u in n.users],
        is_output=lambda n: any(u.op == "output" for u in n.users))
    return {n.name for n in keep}


class _Fp16Emulator(torch.fx.Interpreter):
    """Runs a graph in fp32 kernels but rounds every weight and every intermediate tensor to
    fp16, as an fp16 ML Program stores them (fast on CPUs that lack fp16 kernels). Sampling
    coordinates and the samplers' arithmetic stay fp32, as :func:`to_coreml` converts them; a
    sampler's result is rounded, as the program casts it back to fp16."""

    def __init__(self, gm):
        super().__init__(gm)
        self.fp32 = _fx_coordinate_nodes(gm)

    def run_node(self, n):
        out = super().run_node(n)
        keep32 = n.name in self.fp32 and "grid_sampler" not in str(n.target)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and not keep32:
            return out.half().float()
        return out


@torch.no_grad()
def run_fp16_emulated(gm: torch.fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    return _Fp16Emulator(gm).run(x.half().float())


RANDOM_WEIGHTS_FP16 = ("not gated: random weights — how far fp16 rounding moves a randomly initialised network "
                       "says little about how far it moves your trained one; export with --weights for a gated "
                       "fp16 check")


def _without_final_softmax(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The program's logits: probabilities saturate (a confident classifier's are 0 and 1 in any
    precision), so parity is judged on what feeds the classifier's softmax."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    last = flat[0]
    if len(flat) != 1 or last.op != "call_function" or "softmax" not in str(last.target):
        raise RuntimeError(f"classifier program does not end in softmax (ends in {last.target})")
    out.args = ((last.args[0],),) if isinstance(out.args[0], (tuple, list)) else (last.args[0],)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def check(path: Path, model: torch.nn.Module, pipe, *, precision: str, tensor_input: bool, logits: bool,
          gate_fp16: bool = True) -> dict:
    """Structure + fp32 parity (always gated) + fp16-emulated parity (gated with real weights only).
    ``model`` is the original network (logits); for a classifier the program's softmax is left out
    of the numeric comparison."""
    from .check import compare, seeded_inputs

    checks = {}
    s = inspect_program(path)
    problems = []
    if s["high_rank"]:
        problems.append(f"{len(s['high_rank'])} tensors of rank > 5 (first: {s['high_rank'][0]})")
    if s["dynamic"]:
        problems.append(f"{len(s['dynamic'])} tensors with dynamic shape (first: {s['dynamic'][0]})")
    want_in = ("multiArrayType" if tensor_input else "imageType")
    if s["inputs"][0][1] != want_in:
        problems.append(f"input is {s['inputs'][0][1]}, expected {want_in}")
    if s["classifier"] == logits:
        problems.append("classifier output missing" if not logits else "expected raw logits, got a classifier")
    mixed = ""
    if precision == "fp16" and s["fp32_ops"]:
        n32 = sum(s["fp32_ops"].values())
        mixed = f", {n32} ops kept fp32 (sampling coordinates: {s['fp32_ops'].get('resample', 0)} resample)"
    checks["structure"] = {"passed": not problems, "max_rank": s["max_rank"], "ops": s["ops"],
                           "fp32_ops": s["fp32_ops"] if precision == "fp16" else None,
                           "inputs": s["inputs"], "outputs": s["outputs"],
                           "summary": "; ".join(problems) if problems else
                           f"{sum(s['ops'].values())} ops, max rank {s['max_rank']}, all shapes static, "
                           f"input {s['inputs'][0][1]}, {'classifier' if s['classifier'] else 'logits'} output"
                           + mixed}
    gm = pipe.program.module() if logits else _without_final_softmax(pipe.program.module())
    xs = seeded_inputs(tuple(pipe.example_input.shape), 3, pipe.input_scale if pipe.raw_input else None)
    refs, outs32, outs16 = [], [], []
    with torch.no_grad():
        for x in xs:
            refs.append(model(pipe.reference_input(x)).numpy())
            outs32.append(gm(x).numpy())
        for x in xs:
            outs16.append(run_fp16_emulated(gm, x).numpy())
    what = "" if logits else ", logits before the classifier's softmax"
    checks["parity"] = compare(outs32, refs, FP32_TOLERANCE, reference="pytorch fp32 (torch program handed to "
                                                                       f"coremltools, fp32{what})").as_dict()
    if precision == "fp16":
        p16 = compare(outs16, refs, FP16_TOLERANCE, reference=f"pytorch fp32 (same program, fp16 emulated{what})")
        d = p16.as_dict()
        d["min_cosine"] = FP16_MIN_COSINE
        d["within_gate"] = p16.passed and p16.cosine >= FP16_MIN_COSINE
        d["gated"] = gate_fp16
        d["passed"] = d["within_gate"] or not gate_fp16
        if not gate_fp16:
            d["note"] = RANDOM_WEIGHTS_FP16
        checks["parity_fp16"] = d
    return checks
