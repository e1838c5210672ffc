"""The pass registry and the runner that proves each pass (each format names its default pipeline).

``run_passes`` takes the captured program, applies the named passes one by one to its unlifted
graph, checks after every pass that the rewritten graph computes the same function on a seeded
input (relative max error ≤ 1e-5 in fp32; a pass that breaks that is rolled back and reported as
refused), then re-exports the result so every backend receives a fresh ``ExportedProgram``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..errors import EdgeExportError
from ..progress import Callback, emit
from .base import GraphStats, Pass, PassContext, PassRefused, annotate, finish, graph_stats, rel_err
from .batchnorm_as_affine import BatchNormAsAffine
from .cancel_reshapes import CancelReshapes
from .deconv_as_shuffle import DeconvAsShuffle
from .decompose_norms import DecomposeNorms
from .fold_batchnorm import FoldBatchNorm
from .float_scalars import FloatScalars
from .fold_constants import FoldConstants
from .grid_sample_gather import GridSampleGather
from .hardswish_as_relu6 import HardswishAsRelu6
from .linear_to_conv import LinearToConv
from .matmul_as_einsum import MatmulAsEinsum
from .matmul_to_bmm import MatmulToBmm
from .mean_as_gemm import MeanAsGemm
from .normalize_input import NormalizeInput
from .rank_le5 import RankLe5
from .softmax_rows import SoftmaxRows
from .split_to_slices import SplitToSlices
from .static_shapes import StaticShapes
from .token_maps import TokenMaps
from .views_as_reshape import ViewsAsReshape

EXACT_TOL = 1e-5     # a rewrite must keep the output this close (relative) …
NOISE_FACTOR = 10    # … or within 10× of what a few fp32 roundings of the input move this network


def rounding_noise(gm, example: torch.Tensor, out) -> float:
    """How far the network's output moves when its input moves by a few fp32 roundings at the
    input's scale (2^-22 · max|x|, seeded noise): an exact rewrite reorders float arithmetic (an
    in-graph normalisation rounds 2–4 times per pixel), and a network that amplifies rounding
    (random weights with a gain of ~100 do) moves by that much from it alone."""
    g = torch.Generator().manual_seed(0)
    ulp = 2.0 ** -22 * example.abs().max()
    noisy = example + ulp * torch.randn(example.shape, generator=g, dtype=example.dtype)
    return max(rel_err(o, r) for o, r in zip(_flat(annotate(gm, (noisy,))), _flat(out)))

PASSES: dict[str, Pass] = {p.name: p for p in (
    StaticShapes(), FoldConstants(), FoldBatchNorm(), RankLe5(), CancelReshapes(), LinearToConv(), NormalizeInput(),
    SplitToSlices(), MatmulToBmm(), DecomposeNorms(), MeanAsGemm(), FloatScalars(),
    ViewsAsReshape(), SoftmaxRows(), BatchNormAsAffine(), MatmulAsEinsum(),
    GridSampleGather(), TokenMaps(), HardswishAsRelu6(), DeconvAsShuffle())}



@dataclass
class PassResult:
    name: str
    changed: int
    before: GraphStats
    after: GraphStats
    max_rel_err: float = 0.0
    refused: str | None = None

    def as_dict(self) -> dict:
        """For manifests: only what this pass changed — ``delta`` maps each count that moved to
        [before, after] (``by_op``: per op type); the whole tables are the manifest's ``graph``."""
        return {"name": self.name, "changed": self.changed, "refused": self.refused,
                "max_rel_err": self.max_rel_err, "delta": self.delta()}

    def delta(self) -> dict:
        b, a = self.before.as_dict(), self.after.as_dict()
        out = {k: [b[k], a[k]] for k in b if k != "by_op" and b[k] != a[k]}
        ops = {op: [b["by_op"].get(op, 0), a["by_op"].get(op, 0)]
               for op in sorted(set(b["by_op"]) | set(a["by_op"])) if b["by_op"].get(op, 0) != a["by_op"].get(op, 0)}
        if ops:
            out["by_op"] = ops
        return out


@dataclass
class PipelineResult:
    program: torch.export.ExportedProgram
    passes: list[PassResult]
    before: GraphStats
    after: GraphStats
    example_input: torch.Tensor          # an input in the domain the rewritten program expects
    raw_input: bool = False              # normalize_input applied: the program takes raw pixels
    input_scale: float = 255.0
    contract_passes: list[Pass] = field(default_factory=list)  # passes that changed the input contract
    context: PassContext | None = None
    tolerance: float = EXACT_TOL         # what each pass was held to (EXACT_TOL, or the noise floor)

    def reference_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the original model must be fed to match the rewritten program fed ``x``."""
        for p in self.contract_passes:
            x = p.reference_input(x, self.context)
        return x


def resolve_passes(spec: str | list[str] | None, backend: str, *, tensor_input: bool = False) -> list[str]:
    """``default`` | ``none`` | ``name,name,...`` → a list of pass names (validated); ``default`` is
    the format's own pipeline (``exporters.FORMATS[backend].passes``)."""
    from ..exporters import get

    if spec is None or spec == "default":
        names = list(get(backend).passes)
        if tensor_input and "normalize_input" in names:
            names.remove("normalize_input")
        return names
    if spec == "none" or spec == []:
        return []
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise EdgeExportError(f"unknown pass '{unknown[0]}'; known passes: {', '.join(PASSES)} "
                              "(or 'default', 'none'); run 'edgevit-export passes'")
    return names


def run_passes(ep: torch.export.ExportedProgram, names: list[str], ctx: PassContext,
               progress: Callback | None = None) -> PipelineResult:
    gm = ep.module()
    start = graph_stats(gm)
    results: list[PassResult] = []
    contract: list[Pass] = []
    cur_out = annotate(gm, ctx.example_inputs)  # the current program's output on the current input
    tol = max(EXACT_TOL, NOISE_FACTOR * rounding_noise(gm, ctx.example_inputs[0], cur_out))
    for name in names:
        p = PASSES[name]
        emit(progress, f"pass {name}")
        backup = copy.deepcopy(gm)
        before = graph_stats(gm)
        x = p.sample_input(ctx)
        x_in = x if x is not None else ctx.example_inputs[0]
        try:
            changed = p.apply(gm, ctx)
        except PassRefused as e:
            gm = backup
            results.append(PassResult(name, 0, before, before, refused=str(e)))
            continue
        if not changed:  # nothing rewritten: nothing to prove
            results.append(PassResult(name, 0, before, before))
            continue
        finish(gm)
        for n in gm.graph.nodes:   # provenance: the nodes this pass wrote (see base.inherit_provenance)
            if isinstance(n.meta.get("custom"), dict):
                n.meta["custom"].setdefault("written_by", name)
        ref = cur_out if x is None else annotate(backup, (p.reference_input(x_in, ctx),))
        out = annotate(gm, (x_in,))
        err = max(rel_err(o, r) for o, r in zip(_flat(out), _flat(ref)))
        if err > tol:
            gm = backup
            results.append(PassResult(name, 0, before, before, max_rel_err=err,
                                      refused=f"rewrite changed the numbers (relative error {err:.2e} > {tol:.1e})"))
            continue
        if x is not None:  # the input contract changed (raw pixels from now on)
            ctx.example_inputs = (x,)
            contract.append(p)
        cur_out = out
        results.append(PassResult(name, changed, before, graph_stats(gm), max_rel_err=err))
    with torch.no_grad():
        program = torch.export.export(gm, ctx.example_inputs) if names else ep
    return PipelineResult(program, results, start, results[-1].after if results else start,
                          ctx.example_inputs[0], raw_input=bool(contract), input_scale=ctx.input_scale,
                          contract_passes=contract, context=ctx, tolerance=tol)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]
