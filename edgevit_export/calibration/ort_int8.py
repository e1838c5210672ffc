"""Static int8 QDQ ONNX with ``onnxruntime.quantization``, and what it cost.

``quant_pre_process`` first, then calibration (:mod:`.calibrate`), then QDQ with uint8 activations
and int8 weights (per-channel or per-tensor). Float and int8 run on the same evaluation images;
per-layer sensitivity ranks the quantized tensors by the error their Q/DQ injects, and
``keep_float="auto"`` keeps the worst ones in float, one at a time, until the drop is within
``max_drop`` (the keep-float rescue).
"""

from __future__ import annotations

from pathlib import Path

from ..quiet import silenced
from ..errors import EdgeExportError
from ..exporters.artifacts import size_bytes
from ..progress import Callback, emit, prefixed
from . import accuracy as acc
from .calibrate import calibrate, calibration_info, calibration_method
from .data import ImageSource, SyntheticSource
from .evaluation import eval_source, float_vs_quantized, rank_images
from .rescue import SENSITIVITY_CANDIDATES, Candidate, from_sensitivity, merge, rescue
from .results import Job, QuantizeResult, manifest, timed
from .options import known_nodes
from .sensitivity import Sensitivity, sensitivity
from .target import random_init_note, random_weights

SCHEME_TOOL = "onnxruntime.quantization (quant_pre_process + quantize_static, QDQ)"


# Kept float by default: onnxruntime's int8 Softmax (QLinearSoftmax) is slower than its float one
# (SHViT-S4 at 1024: 13 ms against 2 ms) and its 8-bit probabilities cost accuracy; so is the rest
# of an attention between its projections (see attention_region).
DEFAULT_FLOAT_OPS = ("Softmax",)
# what lies between an attention's projections: reshaping, splitting, scaling, the products, softmax
_ATTENTION_GLUE = ("Transpose", "Reshape", "Split", "Slice", "Squeeze", "Unsqueeze", "Mul", "Div", "Softmax",
                   "MatMul", "Gather", "Add")


def quantized_op_types(float_ops=DEFAULT_FLOAT_OPS) -> list[str]:
    """The op types quantize_static may quantize: all it knows in QDQ, less ``float_ops``."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - set(float_ops))


def quantize_qdq(pre_path: Path, out_path: Path, cache: Path, method: str, *, per_channel: bool,
                 reduce_range: bool, exclude: list[str], float_ops=DEFAULT_FLOAT_OPS) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(pre_path), str(out_path), None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=quantized_op_types(float_ops),
                    nodes_to_exclude=list(exclude), calibrate_method=calibration_method(method),
                    calibration_cache_path=str(cache),
                    extra_options={"QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})


NORM_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "BatchNormalization")
MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _graph(path: Path):
    """(graph, constant tensor names, producer of each tensor, consumers of each tensor)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return g, consts, producer, consumers


def attention_region(path: Path) -> list[str]:
    """The nodes of every attention between its projections, kept float by default.

    From each product of two activations (q·kᵀ, attn·v), up and down through reshapes, transposes,
    splits, scaling by a constant and the softmax, stopping at anything with weights, a norm or a
    residual add. In int8, onnxruntime runs these as QLinearSoftmax, int8 MatMuls and explicit
    transposes of the attention map; in float it fuses the transposes and the scale into its MatMul:
    SHViT-S4 at 1024, the attentions cost about 115 ms in int8 against 35 ms in float.
    """
    g, consts, producer, consumers = _graph(path)

    def acts(n) -> list[str]:
        return [i for i in n.input if i and i not in consts]

    def glue(n) -> bool:
        if n.op_type not in _ATTENTION_GLUE:
            return False
        if n.op_type in ("Mul", "Div", "Add"):      # by a constant only (scale, bias): not a residual
            return len(acts(n)) == 1
        if n.op_type == "MatMul":                   # a product of two activations, not a projection
            return len(acts(n)) == 2
        return True

    region: set[str] = set()
    stack = [n for n in g.node if n.op_type == "MatMul" and len(acts(n)) == 2]
    while stack:
        n = stack.pop()
        if n.name in region:
            continue
        region.add(n.name)
        for t in acts(n):
            p = producer.get(t)
            if p is not None and glue(p):
                stack.append(p)
        for o in n.output:
            stack += [c for c in consumers.get(o, []) if glue(c)]
    return [n.name for n in g.node if n.name in region]


def culprits(path: Path) -> list[Candidate]:
    """The usual suspects of a transformer's int8 error, one candidate per kind: attention products
    (MatMul of two activations), norms, GELU (Erf with its arithmetic, or Gelu), residual adds,
    the first and the last MAC layer."""
    g, consts, producer, consumers = _graph(path)

    def acts(n) -> int:
        return sum(1 for i in n.input if i and i not in consts)

    groups: list[tuple[str, list[str]]] = []
    mm = [n.name for n in g.node if n.op_type == "MatMul" and acts(n) == 2]
    groups.append((f"attention products ({len(mm)} MatMul of two activations)", mm))
    norms = [n for n in g.node if n.op_type in NORM_OPS]
    # a norm's affine (Mul/Add by a constant) right after it goes with it
    norm_nodes = [n.name for n in norms] + [c.name for n in norms for c in consumers.get(n.output[0], [])
                                             if c.op_type in ("Mul", "Add") and acts(c) == 1]
    groups.append((f"norms ({len(norms)} {'/'.join(sorted({n.op_type for n in norms})) or 'none'})", norm_nodes))
    gelu = []
    for n in g.node:
        if n.op_type == "Gelu":
            gelu.append(n.name)
        elif n.op_type == "Erf":            # x * 0.5 * (1 + erf(x / sqrt 2)): the Div before, the Add/Muls after
            gelu.append(n.name)
            p = producer.get(n.input[0])
            if p is not None and p.op_type in ("Div", "Mul"):
                gelu.append(p.name)
            frontier = [n]
            for _ in range(3):
                frontier = [c for f in frontier for c in consumers.get(f.output[0], []) if c.op_type in ("Add", "Mul")]
                gelu += [c.name for c in frontier]
    groups.append((f"GELU ({sum(1 for n in g.node if n.op_type in ('Erf', 'Gelu'))})", list(dict.fromkeys(gelu))))
    res = [n.name for n in g.node if n.op_type == "Add" and acts(n) == 2]
    groups.append((f"residual adds ({len(res)} Add of two activations)", res))
    macs = [n for n in g.node if n.op_type in MAC_OPS and acts(n) == 1]
    if macs:
        groups.append((f"first layer ({macs[0].op_type} {macs[0].name})", [macs[0].name]))
        groups.append((f"last layer ({macs[-1].op_type} {macs[-1].name})", [macs[-1].name]))
    return [Candidate(label, [x for x in nodes if x], "culprit") for label, nodes in groups if any(nodes)]


def _pre_process(float_path: Path, pre_path: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with silenced():
        quant_pre_process(str(float_path), str(pre_path), skip_symbolic_shape=False)


def _named_nodes(pre_path: Path, keep) -> list[str]:
    """The nodes ``--keep-float NODE,…`` names (each checked against the graph), or none."""
    import onnx

    if not isinstance(keep, list):
        return []
    return known_nodes(keep, [n.name for n in onnx.load(str(pre_path), load_external_data=False).graph.node])


class _Int8:
    """One int8 quantization job, stage by stage; :meth:`run` returns the result."""

    def __init__(self, job: Job, step: Callback | None):
        self.job, self.opts, self.step = job, job.opts, step
        self.seconds: dict[str, float] = {}
        self.notes = [n for n in (job.opts.reduce_range_note, job.target.note) if n]
        self.pre_path = job.tmp / "float.pre.onnx"
        self.staged = job.tmp / job.artifact.name
        self.cache: Path | None = None
        self.excluded: list[str] = []

    def run(self) -> QuantizeResult:
        job, opts, step = self.job, self.opts, self.step
        with timed(self.seconds, "export"):
            float_path, float_manifest = self._float_model()
        emit(step, "pre-process (shape inference, optimisation)")
        with timed(self.seconds, "pre_process"):
            _pre_process(float_path, self.pre_path)
        self.excluded = _named_nodes(self.pre_path, opts.keep_float)
        self.float_default = attention_region(self.pre_path)
        with timed(self.seconds, "calibrate"):
            self.cache = calibrate(self.pre_path, job.calib_src, opts.method, job.tmp, threads=opts.threads,
                                   progress=step)
        calib_info, calib_notes = calibration_info(job)
        self.notes += calib_notes
        emit(step, "quantize")
        with timed(self.seconds, "quantize"):
            self._quantize()
        # evaluation: float once, int8 per attempt
        with timed(self.seconds, "evaluate"):
            ev_src, ev_info = eval_source(job.eval_set, opts.eval_size, job.target, job.calib_src, opts.seed)
            self._float_fn = acc.OrtPredictor(self.pre_path, threads=opts.threads)
            self._int8_fn = acc.OrtPredictor(self.staged, threads=opts.threads)
            lg, comparison = float_vs_quantized(self._float_fn, self._int8_fn, ev_src, ev_info, step,
                                                "evaluate float + int8")
        sens = self._sensitivity(comparison.drop > opts.max_drop and not random_weights(job.target, opts))
        baseline, steps, ranking = None, [], []
        if opts.keep_float == "auto" and comparison.drop > opts.max_drop:
            baseline = comparison
            with timed(self.seconds, "keep_float"):
                comparison, steps, ranking = self._keep_float_auto(sens, lg, ev_src, comparison)
        if job.eval_set is None:
            self.notes.append(f"no --eval: the gate applies to {comparison.drop_label} "
                              f"({ev_info.note.split(': ', 1)[-1]})")
        scheme = ("int8 QDQ: uint8 asymmetric activations, int8 symmetric "
                  f"{'per-channel' if opts.per_channel else 'per-tensor'} weights"
                  + (" (7-bit range)" if opts.reduce_range else "")
                  + (f"; attention in float ({len(self.float_default)} nodes)" if self.float_default else ""))
        sizes = {"float_bytes": size_bytes(float_path), "int8_bytes": size_bytes(self.staged)}
        res = QuantizeResult(job.target.name, "onnx", job.target.hw, job.artifact, job.manifest_path, {}, scheme,
                             opts.method, calib_info, ev_info, comparison, baseline, opts.max_drop, self.excluded,
                             steps, sens, self.notes, sizes, self.seconds)
        res.ranking = ranking
        res.manifest = manifest(res, job.target, float_manifest, opts, opts.per_channel, self.staged, SCHEME_TOOL,
                                extra={"float_by_default": {
                                    "op_types": list(DEFAULT_FLOAT_OPS), "attention_nodes": self.float_default,
                                    "why": "onnxruntime's int8 attention (QLinearSoftmax, int8 MatMuls, explicit "
                                           "transposes) is slower than its fused float one, and less accurate"}})
        return res

    def _float_model(self) -> tuple[Path, dict | None]:
        """The float ONNX: exported here (and checked against PyTorch) for a model name."""
        from .. import api

        target, step = self.job.target, self.step
        if target.kind != "model":
            return target.path, target.float_manifest
        emit(step, "export float ONNX")
        r = api.export(target.name, format="onnx", res=target.hw, weights=self.opts.weights,
                       out=self.job.tmp / "float", force=True, check=True,
                       progress=prefixed(step, "export float ONNX: "))
        if not r.passed:
            raise EdgeExportError(f"the float ONNX export of {target.name} did not match PyTorch "
                                  "(run 'edgevit-export export' to see the parity figures)")
        if r.random_init:
            self.notes.append(random_init_note(target.name))
        return r.artifact, r.manifest

    def _quantize(self, excluded: list[str] | None = None) -> None:
        """The int8 program into ``staged``: the default float set plus ``excluded`` (default: the
        nodes kept float so far) in float, with the one calibration."""
        quantize_qdq(self.pre_path, self.staged, self.cache, self.opts.method, per_channel=self.opts.per_channel,
                     reduce_range=self.opts.reduce_range,
                     exclude=self.float_default + (self.excluded if excluded is None else excluded))

    def _sensitivity(self, needed: bool) -> list[Sensitivity]:
        """Per-layer sensitivity on a few calibration images (:meth:`QuantizeOptions.sensitivity_images`)."""
        opts, src, pre = self.opts, self.job.calib_src, self.job.target.preprocess
        n = opts.sensitivity_images(needed)
        if n == 0:
            return []
        if src.synthetic:
            s_src = SyntheticSource(n, pre, seed=opts.seed)
        else:
            s_src = ImageSource(list(src.used), pre, root=src.root, limit=n)
        with timed(self.seconds, "sensitivity"):
            return sensitivity(self.pre_path, self.staged, s_src, self.job.tmp / "debug", threads=opts.threads,
                               progress=self.step)

    def _keep_float_auto(self, sens: list[Sensitivity], lg: acc.Logits, ev_src, comparison: acc.Comparison):
        """Rank the culprits and the table's worst rows by what keeping each float does to the logits,
        then keep them float greedily while the drop falls (:mod:`.rescue`; same calibration)."""
        opts = self.opts
        cands = merge(culprits(self.pre_path), from_sensitivity(sens, SENSITIVITY_CANDIDATES),
                      self.float_default + self.excluded, opts.keep_float_max)
        images, note = rank_images(self.job.calib_src, ev_src, opts.seed)
        def build(excluded: list[str]):
            self._quantize(excluded)
            return acc.OrtPredictor(self.staged, threads=opts.threads)

        r = rescue(cands, self.excluded, lg, ev_src, images, self._float_fn, self._int8_fn, build, opts, comparison,
                   self.step)
        self.excluded[:] = r.excluded
        if note:
            self.notes.append(note)
        final = r.comparison or comparison
        if final.drop > opts.max_drop:
            tried = len(r.ranking)
            self.notes.append(f"--keep-float auto tried {tried} candidates and kept {len(self.excluded)} nodes in "
                              f"float; the drop is still {final.drop:.2f} > {opts.max_drop:g}; try --method "
                              "percentile or entropy, more calibration images, or --per-channel")
        return final, r.steps, r.ranking


def quantize_onnx(job: Job, step: Callback | None) -> QuantizeResult:
    """Int8 QDQ of ``job``, staged in ``job.tmp``."""
    return _Int8(job, step).run()
