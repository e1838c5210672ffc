"""Which images a quantized model is judged on, the float-vs-quantized run over them, and the
``evaluate`` command (top-1/top-5 of a model or an ONNX artifact on a labelled folder)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, EdgeExportError
from ..progress import Callback
from . import accuracy as acc
from .data import (ImageScan, ImageSource, LabelledSet, SyntheticSource, check_classes, is_labelled, scan_images,
                   scan_labelled, spread)
from .data import PreprocessOverrides
from .options import at_least_one, check_threads
from .results import EvalInfo
from .target import Target, random_init_note, resolve_target

DEFAULT_UNLABELLED_EVAL = 200  # images compared float vs int8 when no --eval is given (at ≤ 256² pixels)
MIN_UNLABELLED_EVAL = 16


def unlabelled_count(hw: tuple[int, int], base: int = DEFAULT_UNLABELLED_EVAL) -> int:
    """How many images an unlabelled comparison uses by default: ``base`` up to 256×256, fewer
    above in proportion to the pixels (each costs that much more; 1024² → 16), at least 16."""
    scale = min(1.0, (256 * 256) / (hw[0] * hw[1]))
    return max(min(base, MIN_UNLABELLED_EVAL), round(base * scale))


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


def eval_source(eval_set, eval_size: int | None, target: Target, calib_src, seed: int,
                default_count: int = DEFAULT_UNLABELLED_EVAL):
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
    n = eval_size or unlabelled_count(target.hw, default_count)
    if calib_src is None or isinstance(calib_src, SyntheticSource):
        src = SyntheticSource(n, pre, seed=seed + 1000)
        return src, EvalInfo("synthetic (drawn shapes, other seed)", False, n,
                             note="no --eval: agreement with float on synthetic images, not accuracy")
    # held-out images of the calibration folder (the ones calibration did not use), else the same
    skipped = {p for p, _ in calib_src.skipped}   # corrupt files calibration already met
    rest = [f for f in calib_src.files if f not in set(calib_src.used) and str(f) not in skipped]
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


def rank_images(calib_src, ev_src, seed: int, count: int | None = None) -> tuple[list, str]:
    """Preprocessed images the keep-float rescue ranks its candidates on: calibration-folder images
    that neither calibration nor the evaluation used (else the calibration images themselves, said
    in the note), or synthetic ones of another seed for synthetic calibration."""
    from .rescue import RANK_IMAGES

    n = count or RANK_IMAGES
    if calib_src is None or isinstance(calib_src, SyntheticSource):
        return [it.x for it in SyntheticSource(n, calib_src.preprocess if calib_src else ev_src.preprocess,
                                               seed=seed + 2000)], ""
    taken = {str(f) for f in calib_src.used} | {str(f) for f in getattr(ev_src, "files", [])}
    rest = [f for f in calib_src.files if str(f) not in taken]
    note = ""
    if not rest:
        rest = list(calib_src.used)
        note = ("--keep-float auto ranked its candidates on calibration images (the folder has none held out: "
                "give it more images than --calib-size)")
    return [it.x for it in ImageSource(rest, calib_src.preprocess, root=calib_src.root, limit=n)], note


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
    preprocess: str = ""         # the eval transform the images went through (Preprocess.describe())


def evaluate(model: str, data: str | Path, *, res=None, weights: str | None = None, labels: str | Path | None = None,
             limit: int | None = None, threads: int = 2, seed: int = 0, crop_pct=None,
             interpolation: str | None = None, mean=None, std=None,
             progress: Callback | None = None) -> EvaluateResult:
    """Top-1/top-5 of a model (PyTorch) or an .onnx artifact on a labelled folder, its images read
    with the model's own eval transform (an .onnx: its manifest's), or ``crop_pct``/
    ``interpolation``/``mean``/``std`` given here."""
    from .. import api

    check_threads(threads)
    at_least_one("--limit", limit)
    pre_overrides = PreprocessOverrides.parse(crop_pct, interpolation, mean, std)
    target = resolve_target(model, res, weights, purpose="evaluate", preprocess=pre_overrides)
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
                          time.perf_counter() - t, notes, target.preprocess.describe())
