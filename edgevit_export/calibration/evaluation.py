"""Which images a quantized model is judged on, the float-vs-quantized run over them, and the
``evaluate`` command (top-1/top-5 of a model or an ONNX artifact on a labelled folder)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, EdgeExportError
from ..progress import Callback, emit
from . import accuracy as acc
from .data import (ImageScan, ImageSource, LabelledSet, SyntheticSource, check_classes, is_labelled, scan_images,
                   scan_labelled, spread)
from .options import at_least_one
from .results import EvalInfo, KeepFloatStep
from .target import Target, random_init_note, resolve_target

DEFAULT_UNLABELLED_EVAL = 200  # images compared float vs int8 when no --eval is given


def evaluation_set(eval_dir: str | Path | None, labels: str | Path | None, target: Target):
    """A labelled set (checked against the model's head), an unlabelled scan, or None."""
    if eval_dir is None:
        if labels is not None:
            raise EdgeExportError("--labels needs --eval DIR (a labelled folder)")
        return None
    root = Path(eval_dir).expanduser()
    if labels is not None or (root.is_dir() and is_labelled(root)):
        ds = scan_labelled(root, labels, what="--eval")
        check_classes(ds, target.num_classes, target.head)
        return ds
    return scan_images(root, what="--eval")


def _subset(ds: LabelledSet, limit: int | None, seed: int) -> tuple[list[Path], list[int]]:
    """At most ``limit`` of the set's (files, labels), spread over its classes, in folder order."""
    files, labels = ds.files, ds.labels
    if limit is not None and limit < len(files):
        order = sorted(spread(list(range(len(files))), seed)[:limit])
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    return files, labels


def eval_source(eval_set, eval_size: int | None, target: Target, calib_src, seed: int):
    """(source, EvalInfo): the labelled set, an unlabelled folder, or held-out calibration images."""
    pre = target.preprocess
    if isinstance(eval_set, LabelledSet):
        files, labels = _subset(eval_set, eval_size, seed)
        src = ImageSource(files, pre, labels=labels, root=eval_set.root)
        return src, EvalInfo(str(eval_set.root), True, len(files), len(eval_set.classes), eval_set.non_images)
    if isinstance(eval_set, ImageScan):
        files = spread(eval_set.files, seed)[: eval_size or len(eval_set.files)]
        src = ImageSource(files, pre, root=eval_set.root)
        return src, EvalInfo(str(eval_set.root), False, len(files), None, eval_set.non_images,
                             note="no class folders: agreement with float, not accuracy")
    n = eval_size or DEFAULT_UNLABELLED_EVAL
    if calib_src is None or isinstance(calib_src, SyntheticSource):
        src = SyntheticSource(n, pre, seed=seed + 1000)
        return src, EvalInfo("synthetic (drawn shapes, other seed)", False, n,
                             note="no --eval: agreement with float on synthetic images, not accuracy")
    # held-out images of the calibration folder (the ones calibration did not use), else the same
    rest = [f for f in calib_src.files if f not in set(calib_src.used)]
    files = rest[:n] if rest else calib_src.used[:n]
    note = ("no --eval: agreement with float on calibration-folder images not used for calibration"
            if rest else "no --eval: agreement with float on the calibration images themselves")
    return ImageSource(files, pre, root=calib_src.root), EvalInfo(str(calib_src.root), False, len(files), note=note)


def float_vs_quantized(float_fn, quant_fn, source, info: EvalInfo, progress: Callback | None, task: str,
                       **names: str) -> tuple[acc.Logits, acc.Comparison]:
    """Both predictors over ``source`` (``info`` learns how many images were read, which were
    corrupt); the comparison is named by ``names`` (reference=…, candidate=…)."""
    lg = acc.collect_logits({"float": float_fn, "quantized": quant_fn}, source, progress=progress, task=task)
    info.images, info.corrupt = len(lg.keys), lg.skipped
    if info.images == 0:
        raise DataError(f"no readable evaluation images in {info.source}; pass a folder of valid images")
    return lg, acc.compare(lg.values["float"], lg.values["quantized"], lg.labels, **names)


def keep_float_rescue(candidates, excluded: list[str], lg: acc.Logits, ev_src, opts, requantize,
                      progress: Callback | None, what: str = "int8"):
    """The keep-float rescue: add the next candidate's nodes to ``excluded`` (kept in float),
    ``requantize()`` (→ a predictor of the new int8 program), evaluate it against the same float
    logits; until within ``opts.max_drop`` or after ``opts.keep_float_max`` steps. Returns the
    steps and the last comparison (None when no candidate was left)."""
    steps, comparison = [], None
    images = list(ev_src) if len(ev_src) <= 2048 else ev_src   # in memory once, not re-read each step
    for cand in candidates:
        if len(steps) >= opts.keep_float_max:
            break
        new = [nm for nm in cand.nodes if nm not in excluded]
        if not new:
            continue
        excluded.extend(new)
        emit(progress, f"keep float: {', '.join(new)[:60]}")
        predictor = requantize()
        lq = acc.collect_logits({"int8": predictor}, images, progress=progress,
                                task=f"evaluate {what} (keep-float step {len(steps) + 1})")
        comparison = acc.compare(lg.values["float"], lq.values["int8"], lg.labels)
        steps.append(KeepFloatStep(new, f"{cand.kind} {cand.tensor} ({cand.sqnr_db:.1f} dB)", len(excluded),
                                   comparison.drop))
        if comparison.drop <= opts.max_drop:
            break
    return steps, comparison


@dataclass
class EvaluateResult:
    model: str
    kind: str                    # "pytorch" | "onnx"
    res: tuple[int, int]
    dataset: LabelledSet
    topk: acc.TopK
    corrupt: list[tuple[str, str]]
    per_class: dict[str, float]  # class → top-1 percent
    seconds: float
    notes: list[str] = field(default_factory=list)


def evaluate(model: str, data: str | Path, *, res=None, weights: str | None = None, labels: str | Path | None = None,
             limit: int | None = None, threads: int = 2, seed: int = 0,
             progress: Callback | None = None) -> EvaluateResult:
    """Top-1/top-5 of a model (PyTorch) or an .onnx artifact on a labelled folder."""
    from .. import api

    at_least_one("--threads", threads)
    at_least_one("--limit", limit)
    target = resolve_target(model, res, weights, purpose="evaluate")
    root = Path(data).expanduser()
    ds = scan_labelled(root, labels, what="--data")
    check_classes(ds, target.num_classes, target.head, what="--data")
    notes = [target.note] if target.note else []
    if target.kind == "model":
        _, _, net, random_init = api.prepare_model(target.name, target.hw, weights, None)
        if random_init:
            notes.append(random_init_note(target.name))
        pred, kind = acc.TorchPredictor(net, threads), "pytorch"
    else:
        pred, kind = acc.OrtPredictor(target.path, threads=threads), "onnx"
    files, labs = _subset(ds, limit, seed)
    src = ImageSource(files, target.preprocess, labels=labs, root=ds.root)
    t = time.perf_counter()
    lg = acc.collect_logits({"m": pred}, src, progress=progress, task="evaluate")
    if not lg.keys:
        raise DataError(f"no readable images in --data {root} ({len(lg.skipped)} corrupt); pass valid images")
    logits = lg.values["m"]
    per_class = {}
    pred_cls = logits.argmax(1)
    for k, name in enumerate(ds.classes):
        mask = lg.labels == k
        if mask.any():
            per_class[name] = float((pred_cls[mask] == k).mean() * 100)
    return EvaluateResult(target.name, kind, target.hw, ds, acc.top_k(logits, lg.labels), lg.skipped, per_class,
                          time.perf_counter() - t, notes)
