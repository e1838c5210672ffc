"""Static int8 ExecuTorch: PT2E quantization with XNNPACK's own quantizer, lowered to XNNPACK.

The model goes through the ``pte`` pass pipeline first (the rewrites of ``export --format pte``:
norms decomposed, splits as slices, matmuls as bmm), so the quantized program lowers into the
same single delegate. Then torchao's ``prepare_pt2e`` with ExecuTorch's ``XNNPACKQuantizer``
(int8 asymmetric activations, int8 symmetric weights per output channel or per tensor; it
quantizes convolutions, linear layers, adds, muls and average pools — matrix products and softmax
run in fp32 inside the same delegate), calibration in PyTorch, ``convert_pt2e``, ``torch.export``
again, lowered and saved as ``.pte``. Kept in float: concatenations (XNNPACK takes a quantized
concatenation only when every input shares one scale) and the nodes ``decompose_norms`` wrote (a
variance in 8 bits loses the small values its division needs); ``--keep-float`` adds node names.

Accuracy: the float model in PyTorch against the saved ``.pte`` in ExecuTorch's runtime, on the
same images. The keep-float rescue re-quantizes (re-calibrating: a new annotation means new
observers) and measures each step on PyTorch's emulation of the int8 program (the converted
graph: the same integer arithmetic, without a 10-30 s lowering per step); the final figures are
the saved ``.pte``'s own.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings

import numpy as np
import torch

from ..errors import CheckFailed, EdgeExportError
from ..exporters import pte
from ..metrics import db, sqnr_db
from ..passes.base import written_by
from ..progress import Callback, emit
from . import accuracy as acc
from .calibrate import calibration_info, no_calibration_images
from .evaluation import eval_source, float_vs_quantized, rank_images
from .rescue import SENSITIVITY_CANDIDATES, from_sensitivity, merge, rescue
from .options import known_nodes
from .results import Job, QuantizeResult, manifest, timed
from .sensitivity import Sensitivity
from .target import random_init_note

SCHEME_TOOL = "torchao PT2E (prepare_pt2e, convert_pt2e) with ExecuTorch's XNNPACKQuantizer, XNNPACK delegate"
CACHE_BYTES = 256 << 20          # calibration images kept in memory for keep-float steps up to this size
_QD = "quantized_decomposed"


def quantizer(per_channel: bool, method: str, keep: set[str]):
    """ExecuTorch's XNNPACKQuantizer, int8, with our observers and what stays float."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)

    cfg = get_symmetric_quantization_config(is_per_channel=per_channel)
    if method == "minmax":   # ExecuTorch's default is the histogram observer (an L2-optimal range)
        from torchao.quantization.pt2e import MinMaxObserver

        act = dataclasses.replace(cfg.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
        cfg = dataclasses.replace(cfg, input_activation=act, output_activation=act)
    q = XNNPACKQuantizer().set_global(cfg)
    q.set_filter_function(lambda n: quantizable(n, keep))
    return q


def quantizable(n: torch.fx.Node, keep: set[str]) -> bool:
    """Whether the quantizer may annotate ``n``."""
    return (n.target is not torch.ops.aten.cat.default and written_by(n) != "decompose_norms"
            and n.name not in keep)


def _is_qd(n: torch.fx.Node, what: str) -> bool:
    return n.op == "call_function" and str(n.target).startswith(f"{_QD}.{what}")


class _Recorder(torch.fx.Interpreter):
    """Runs a graph and keeps the outputs of the nodes named in ``keep``."""

    def __init__(self, gm, keep: set[str]):
        super().__init__(gm)
        self.keep, self.seen = keep, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.keep:
            self.seen[n.name] = out.detach().to(torch.float64) if isinstance(out, torch.Tensor) else None
        return out


def _module(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path.replace("L['self'].", "").replace("L__self___", "") or n.name


def sensitivity(float_gm, int8_gm, images: list[np.ndarray], progress: Callback | None = None) -> list[Sensitivity]:
    """Per quantized tensor of ``int8_gm`` (the converted PT2E graph): its SQNR after its own
    quantize/dequantize against before it, and against the float graph's same node; per quantized
    weight, dequantized against float. Worst first."""
    pairs = {}                       # producer name → (dequantize name, consumer names)
    for q in int8_gm.graph.nodes:
        if not _is_qd(q, "quantize_per_tensor") or not isinstance(q.args[0], torch.fx.Node):
            continue
        src = q.args[0]
        if src.op != "call_function" or _is_qd(src, ""):
            continue
        for dq in q.users:
            if _is_qd(dq, "dequantize"):
                users = [u.name for u in dq.users if u.op == "call_function"]
                pairs[src.name] = (dq.name, users + pairs.get(src.name, (None, []))[1])
    float_nodes = {n.name: n for n in float_gm.graph.nodes}
    int8_nodes = {n.name: n for n in int8_gm.graph.nodes}
    want = set(pairs) | {d for d, _ in pairs.values()}
    sums = {k: [0.0, 0.0, 0.0, 0.0] for k in pairs}
    emit(progress, "sensitivity", 0, len(images))
    for i, x in enumerate(images):
        t = torch.from_numpy(x[None])
        ri, rf = _Recorder(int8_gm, want), _Recorder(float_gm, set(pairs))
        with torch.no_grad():
            ri.run(t)
            rf.run(t)
        for name, (dq, _) in pairs.items():
            pre, post, ref = ri.seen.get(name), ri.seen.get(dq), rf.seen.get(name)
            if pre is None or post is None or pre.shape != post.shape:
                continue
            s = sums[name]
            s[0] += float((pre ** 2).sum())
            s[1] += float(((pre - post) ** 2).sum())
            if ref is not None and ref.shape == post.shape:
                s[2] += float((ref ** 2).sum())
                s[3] += float(((ref - post) ** 2).sum())
        emit(progress, "sensitivity", i + 1, len(images))
    out = []
    for name, (dq, users) in pairs.items():
        s = sums[name]
        if s[0] == 0.0:
            continue
        n = int8_nodes[name]
        out.append(Sensitivity("activation", _module(n), pte._short(n.target), db(s[0], s[1]),
                               db(s[2], s[3]) if s[2] > 0 else None, list(dict.fromkeys([name] + users))))
    out += _weights(float_gm, float_nodes, int8_gm)
    out.sort(key=lambda s: (s.sqnr_db, s.tensor))
    return out


def _weight_bytes(gm) -> int:
    """Bytes of the weights the float program uses (each tensor once; the module still holds, and
    reads into dead nodes, the originals a pass replaced, e.g. weights before BatchNorm folding)."""
    seen = {}
    for n in gm.graph.nodes:
        t = _attr(gm, n.target) if n.op == "get_attr" and n.users else None
        if isinstance(t, torch.Tensor):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def _attr(gm, target: str):
    return functools.reduce(getattr, target.split("."), gm)


def _weights(float_gm, float_nodes: dict, int8_gm) -> list[Sensitivity]:
    """Each quantized weight (a folded int8 constant behind a dequantize) against its float value."""
    out = []
    for n in int8_gm.graph.nodes:
        if n.op != "call_function" or n.name not in float_nodes or len(n.args) < 2:
            continue
        dq, fw = n.args[1], float_nodes[n.name].args[1] if len(float_nodes[n.name].args) > 1 else None
        if not (isinstance(dq, torch.fx.Node) and _is_qd(dq, "dequantize") and isinstance(fw, torch.fx.Node)
                and fw.op == "get_attr" and dq.args and getattr(dq.args[0], "op", None) == "get_attr"):
            continue
        args = [_attr(int8_gm, a.target) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a
                for a in dq.args]
        if any(isinstance(a, torch.fx.Node) for a in args):
            continue
        w = _attr(float_gm, fw.target).detach().numpy()
        deq = dq.target(*args, **dq.kwargs).detach().numpy()
        if w.size >= 2 and w.shape == deq.shape:
            out.append(Sensitivity("weight", _module(n) + ".weight", pte._short(n.target), sqnr_db(w, deq), None,
                                   [n.name]))
    return out


@dataclasses.dataclass(frozen=True)
class Pt2eTarget:
    """What differs between the runtimes a PT2E int8 program ships to: the pass pipeline it starts
    from, its quantizer, how the converted graph becomes the artifact, and words for the result."""

    format: str                      # "pte" | "tflite": the pass pipeline and the artifact's format
    title: str                       # "ExecuTorch" | "LiteRT"
    quantizer: object                # (per_channel, method, keep: set[str]) -> a PT2E Quantizer
    lower: object                    # (int8 GraphModule, example, path, quantizer, opts) -> facts for the manifest
    scheme_tool: str
    extra_passes: tuple[str, ...] = ()   # after the format's default pipeline (rewrites the int8 delegate needs)
    fold_quantize: bool = True           # convert_pt2e: weights stored int8 (False: float + quantize, litert-torch)
    post_convert: object = None          # GraphModule -> GraphModule, on the converted graph


def _lower_pte(int8_gm, example, path, quantizer, opts) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program_int8 = torch.export.export(int8_gm, (example,))
    return pte.convert(program_int8, example, path, {}, None)


def _pte_quantizer(per_channel: bool, method: str, keep: set[str]):
    return quantizer(per_channel, method, keep)


PTE = Pt2eTarget("pte", "ExecuTorch", _pte_quantizer, _lower_pte, SCHEME_TOOL)


class Pt2eInt8:
    """One PT2E int8 job, stage by stage; :meth:`run` returns the result."""

    def __init__(self, job: Job, step: Callback | None, target: Pt2eTarget = PTE):
        self.job, self.opts, self.step, self.target = job, job.opts, step, target
        self.seconds: dict[str, float] = {}
        self.notes = [n for n in (job.target.note,) if n]
        self.staged = job.tmp / job.artifact.name
        self.excluded: list[str] = []
        self._calib_cache: list[np.ndarray] | None = None

    def run(self) -> QuantizeResult:
        job, opts, step = self.job, self.opts, self.step
        with timed(self.seconds, "export"):
            model, program, example, random_init = self._float_program()
        self.float_gm = program.module()
        names = [n.name for n in self.float_gm.graph.nodes if n.op == "call_function"]
        self.excluded = known_nodes(opts.keep_float, names)
        with timed(self.seconds, "calibrate"):
            int8_gm = self._quantize(example)
        ev_src, ev_info = eval_source(job.eval_set, opts.eval_size, job.target, job.calib_src, opts.seed)
        float_fn = acc.TorchPredictor(model, opts.threads)
        sens = self._sensitivity(int8_gm)
        baseline, steps, lg, ranking = None, [], None, []
        if opts.keep_float == "auto":   # decided on the emulation: one lowering, of the program that ships
            with timed(self.seconds, "evaluate_emulation"):
                lg, emulated = float_vs_quantized(float_fn, acc.TorchPredictor(int8_gm, opts.threads, batch=1),
                                                  ev_src, ev_info, step, "evaluate float + int8 emulation")
            if emulated.drop > opts.max_drop:
                baseline = emulated
                with timed(self.seconds, "keep_float"):
                    steps, ranking, int8_gm = self._keep_float_auto(sens, lg, ev_src, example, int8_gm, float_fn,
                                                                    emulated)
        from ..exporters import get as get_format

        backend = get_format(self.target.format).backend()
        suffix = get_format(self.target.format).suffix
        emit(step, f"convert to {self.target.title} and write the {suffix}")
        with timed(self.seconds, "lower"):
            facts = self.target.lower(int8_gm, example, self.staged, self._quantizer_used, opts)
            structure = backend.structure(backend.describe(self.staged), {})
        if not structure["passed"]:
            raise CheckFailed(f"the int8 program did not lower cleanly: {structure['summary']}")
        with timed(self.seconds, "evaluate"):
            int8_fn = acc.ArtifactPredictor(self.staged, threads=opts.threads)
            if lg is None:
                lg, comparison = float_vs_quantized(float_fn, int8_fn, ev_src, ev_info, step,
                                                    f"evaluate float + int8 ({suffix})")
            else:
                lq = acc.collect_logits({"int8": int8_fn}, ev_src, progress=step,
                                        task=f"evaluate int8 ({suffix})")
                comparison = acc.compare(lg.values["float"], lq.values["int8"], lg.labels)
        if steps and comparison.drop > opts.max_drop:
            self.notes.append(f"--keep-float auto kept {len(self.excluded)} nodes in float over {len(steps)} steps "
                              f"and the drop is still {comparison.drop:.2f} > {opts.max_drop:g}; try --method "
                              "histogram or more calibration images")
        if job.eval_set is None:
            self.notes.append(f"no --eval: the gate applies to {comparison.drop_label} "
                              f"({ev_info.note.split(': ', 1)[-1]})")
        if random_init:
            self.notes.append(random_init_note(job.target.name))
        self.notes.append(structure["summary"])
        if steps:
            self.notes.append("keep-float steps were measured on PyTorch's emulation of the int8 program; the "
                              f"final figures are the saved {suffix}'s in {self.target.title}")
        scheme = ("int8 PT2E: int8 asymmetric activations, int8 symmetric "
                  f"{'per-channel' if opts.per_channel else 'per-tensor'} weights; concatenations and "
                  "decomposed norm statistics in fp32")
        sizes = {"float_bytes": _weight_bytes(self.float_gm), "int8_bytes": facts["bytes"]}
        calib_info, calib_notes = calibration_info(job)
        self.notes += calib_notes
        res = QuantizeResult(job.target.name, self.target.format, job.target.hw, job.artifact, job.manifest_path, {}, scheme,
                             opts.method, calib_info, ev_info, comparison, baseline, opts.max_drop, self.excluded,
                             steps, sens, self.notes, sizes, self.seconds)
        res.ranking = ranking
        float_facts = {"weights": opts.weights, "random_init": random_init, "io": facts["io"]}
        res.manifest = manifest(res, job.target, float_facts, opts, opts.per_channel, self.staged, self.target.scheme_tool,
                                extra={"backend": {k: v for k, v in facts.items() if k != "io"},
                                       "checks": {"structure": structure}})
        return res

    def _float_program(self):
        """The model and its rewritten float program (the format's pipeline, checked pass by pass)."""
        from .. import api
        from ..passes.base import PassContext
        from ..passes.pipeline import resolve_passes, run_passes

        target, step = self.job.target, self.step
        emit(step, "build model")
        info, hw, model, random_init = api.prepare_model(target.name, target.hw, self.opts.weights, None)
        example = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
        emit(step, "capture (torch.export)")
        ep = api.capture(model, example)
        names = resolve_passes("default", self.target.format, tensor_input=True) + list(self.target.extra_passes)
        pipe = run_passes(ep, names,
                          PassContext((example,), mean=info.mean, std=info.std), progress=step)
        refused = [p for p in pipe.passes if p.refused]
        for p in refused:
            self.notes.append(f"pass {p.name} refused: {p.refused}")
        return model, pipe.program, example, random_init

    def _quantize(self, example: torch.Tensor):
        """prepare_pt2e → calibrate → convert_pt2e on a copy of the float graph."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        emit(self.step, f"quantize (PT2E, {self.target.title}'s quantizer)")
        with warnings.catch_warnings():   # torch's pytree deprecations, once per copied graph
            warnings.simplefilter("ignore")
            self._quantizer_used = self.target.quantizer(self.opts.per_channel, self.opts.method, set(self.excluded))
            prepared = prepare_pt2e(copy.deepcopy(self.float_gm), self._quantizer_used)
            n = 0
            with torch.no_grad():
                for x in self._calibration_images():
                    prepared(torch.from_numpy(x[None]))
                    n += 1
            if n == 0:
                raise no_calibration_images(self.job.calib_src)
            converted = convert_pt2e(prepared, fold_quantize=self.target.fold_quantize)
            return self.target.post_convert(converted) if self.target.post_convert else converted

    def _calibration_images(self):
        """The calibration images, with a bar; kept in memory after the first pass when small."""
        if self._calib_cache is not None:
            yield from self._calib_cache
            return
        src, keep = self.job.calib_src, []
        total = len(src)
        emit(self.step, "calibrate", 0, total)
        for i, item in enumerate(src):
            emit(self.step, "calibrate", i + 1, total)
            keep.append(item.x)
            yield item.x
        if sum(x.nbytes for x in keep) <= CACHE_BYTES:
            self._calib_cache = keep

    def _sensitivity(self, int8_gm) -> list[Sensitivity]:
        opts = self.opts
        n = opts.sensitivity_images(False)
        if n == 0:
            return []
        images = []
        for x in self._calibration_images():
            images.append(x)
            if len(images) == n:
                break
        with timed(self.seconds, "sensitivity"):
            return sensitivity(self.float_gm, int8_gm, images, self.step)

    def _keep_float_auto(self, sens: list[Sensitivity], lg: acc.Logits, ev_src, example, int8_gm, float_fn,
                         baseline: acc.Comparison):
        """Rank the table's worst rows by what keeping each float does to the logits, then keep them
        float greedily while the drop falls, each program re-calibrated and measured on the emulation
        (:mod:`.rescue`). Returns the steps, the ranking and the program left built."""
        last = [int8_gm]

        def build(excluded: list[str]):
            self.excluded[:] = excluded
            last[0] = self._quantize(example)
            return acc.TorchPredictor(last[0], self.opts.threads, batch=1)

        images, note = rank_images(self.job.calib_src, ev_src, self.opts.seed)
        cands = merge([], from_sensitivity(sens, SENSITIVITY_CANDIDATES), self.excluded, self.opts.keep_float_max)
        r = rescue(cands, list(self.excluded), lg, ev_src, images, float_fn,
                   acc.TorchPredictor(int8_gm, self.opts.threads, batch=1), build, self.opts, baseline, self.step,
                   what="int8 emulation")
        self.excluded[:] = r.excluded
        if note:
            self.notes.append(note)
        return r.steps, r.ranking, last[0]


def quantize_pte(job: Job, step: Callback | None) -> QuantizeResult:
    """Int8 ExecuTorch of ``job``, staged in ``job.tmp``."""
    if job.target.kind != "model":
        raise EdgeExportError("--format pte needs a model name (and --weights), not an .onnx file")
    return Pt2eInt8(job, step, PTE).run()
