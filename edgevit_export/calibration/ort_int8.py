"""Static int8 QDQ ONNX with ``onnxruntime.quantization``, and what it cost.

``quant_pre_process`` first, then calibration (:mod:`.calibrate`), then QDQ with uint8 activations
and int8 weights (per-channel or per-tensor). Float and int8 run on the same evaluation images;
per-layer sensitivity ranks the quantized tensors by the error their Q/DQ injects, and
``keep_float="auto"`` keeps the worst ones in float, one at a time, until the drop is within
``max_drop`` (the keep-float rescue).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from ..errors import EdgeExportError
from ..exporters.artifacts import size_bytes
from ..progress import Callback, emit, prefixed
from . import accuracy as acc
from .calibrate import calibrate, calibration_info, calibration_method
from .data import ImageSource, SyntheticSource
from .evaluation import eval_source, float_vs_quantized, keep_float_rescue
from .results import Job, KeepFloatStep, QuantizeResult, manifest, timed
from .options import known_nodes
from .sensitivity import Sensitivity, sensitivity
from .target import random_init_note

SCHEME_TOOL = "onnxruntime.quantization (quant_pre_process + quantize_static, QDQ)"


def quantize_qdq(pre_path: Path, out_path: Path, cache: Path, method: str, *, per_channel: bool,
                 reduce_range: bool, exclude: list[str]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(pre_path), str(out_path), None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(exclude), calibrate_method=calibration_method(method),
                    calibration_cache_path=str(cache),
                    extra_options={"QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})


def _pre_process(float_path: Path, pre_path: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
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
            lg, comparison = float_vs_quantized(acc.OrtPredictor(self.pre_path, threads=opts.threads),
                                                acc.OrtPredictor(self.staged, threads=opts.threads), ev_src, ev_info,
                                                step, "evaluate float + int8")
        sens = self._sensitivity()
        baseline, steps = None, []
        if opts.keep_float == "auto" and comparison.drop > opts.max_drop:
            baseline = comparison
            with timed(self.seconds, "keep_float"):
                comparison, steps = self._keep_float_auto(sens, lg, ev_src, comparison)
        if job.eval_set is None:
            self.notes.append(f"no --eval: the gate applies to {comparison.drop_label} "
                              f"({ev_info.note.split(': ', 1)[-1]})")
        scheme = ("int8 QDQ: uint8 asymmetric activations, int8 symmetric "
                  f"{'per-channel' if opts.per_channel else 'per-tensor'} weights"
                  + (" (7-bit range)" if opts.reduce_range else ""))
        sizes = {"float_bytes": size_bytes(float_path), "int8_bytes": size_bytes(self.staged)}
        res = QuantizeResult(job.target.name, "onnx", job.target.hw, job.artifact, job.manifest_path, {}, scheme,
                             opts.method, calib_info, ev_info, comparison, baseline, opts.max_drop, self.excluded,
                             steps, sens, self.notes, sizes, self.seconds)
        res.manifest = manifest(res, job.target, float_manifest, opts, opts.per_channel, self.staged, SCHEME_TOOL)
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

    def _quantize(self) -> None:
        quantize_qdq(self.pre_path, self.staged, self.cache, self.opts.method, per_channel=self.opts.per_channel,
                     reduce_range=self.opts.reduce_range, exclude=self.excluded)

    def _sensitivity(self) -> list[Sensitivity]:
        """Per-layer sensitivity on a few calibration images (at least 4 for keep-float auto)."""
        opts, src, pre = self.opts, self.job.calib_src, self.job.target.preprocess
        if opts.sensitivity_samples == 0 and opts.keep_float != "auto":
            return []
        n = max(opts.sensitivity_samples, 4) if opts.keep_float == "auto" else opts.sensitivity_samples
        if src.synthetic:
            s_src = SyntheticSource(n, pre, seed=opts.seed)
        else:
            s_src = ImageSource(list(src.used), pre, root=src.root, limit=n)
        with timed(self.seconds, "sensitivity"):
            return sensitivity(self.pre_path, self.staged, s_src, self.job.tmp / "debug", threads=opts.threads,
                               progress=self.step)

    def _keep_float_auto(self, sens: list[Sensitivity], lg: acc.Logits, ev_src,
                         comparison: acc.Comparison) -> tuple[acc.Comparison, list[KeepFloatStep]]:
        """Keep the worst candidates' nodes in float (same calibration), see
        :func:`.evaluation.keep_float_rescue`."""
        opts = self.opts

        def requantize():
            self._quantize()
            return acc.OrtPredictor(self.staged, threads=opts.threads)

        steps, last = keep_float_rescue(sens, self.excluded, lg, ev_src, opts, requantize, self.step)
        comparison = last or comparison
        if comparison.drop > opts.max_drop:
            self.notes.append(f"--keep-float auto kept {len(self.excluded)} nodes in float over {len(steps)} steps "
                              f"and the drop is still {comparison.drop:.2f} > {opts.max_drop:g}; try --method "
                              "percentile or entropy, more calibration images, or --per-channel")
        return comparison, steps


def quantize_onnx(job: Job, step: Callback | None) -> QuantizeResult:
    """Int8 QDQ of ``job``, staged in ``job.tmp``."""
    return _Int8(job, step).run()
