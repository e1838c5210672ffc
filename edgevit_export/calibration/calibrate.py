"""Calibration for static int8: activation ranges collected by onnxruntime over images fed through
the model's own preprocessing, in chunks so large resolutions fit in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ..ort import session
from ..progress import Callback, emit
from .data import ImageSource, SyntheticSource, scan_images, spread
from .results import CalibrationInfo
from .target import Target

CALIB_CHUNK = 16               # images per calibration pass (bounds memory at large resolutions)


def calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def calibration_source(calib: str | Path, target: Target, size: int, seed: int = 0):
    """(source, scan) for a folder, or (SyntheticSource, None) for 'synthetic'."""
    if str(calib) == "synthetic":
        return SyntheticSource(size, target.preprocess, seed=seed), None
    scan = scan_images(calib, what="calibration")
    source = ImageSource(spread(scan.files, seed), target.preprocess, root=scan.root, limit=size)
    if next(iter(source), None) is None:       # a folder of only corrupt files is refused before any export
        raise no_calibration_images(source)
    return source, scan


class _Reader:
    """A CalibrationDataReader over at most ``count`` items of an iterator (static batch ``batch``)."""

    def __init__(self, items, input_name: str, batch: int, count: int, on_item: Callable[[], None]):
        self.items, self.input_name, self.batch, self.count, self.on_item = items, input_name, batch, count, on_item
        self.given = 0

    def get_next(self):
        if self.given >= self.count:
            return None
        xs = []
        for it in self.items:
            xs.append(it.x)
            self.on_item()
            if len(xs) == self.batch:
                break
        if not xs:
            return None
        while len(xs) < self.batch:
            xs.append(xs[-1])
        self.given += 1
        return {self.input_name: np.stack(xs)}

    def __iter__(self):
        return self

    def __next__(self):
        d = self.get_next()
        if d is None:
            raise StopIteration
        return d


class _ListReader:
    def __init__(self, feeds: list[dict]):
        self.feeds = list(feeds)

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None


def calibrate(pre_path: Path, source, method: str, workdir: Path, *, threads: int = 2,
              progress: Callback | None = None) -> Path:
    """Collect activation ranges over ``source``; returns the path of onnxruntime's calibration
    cache (reused by every quantization of the same model, so keep-float never re-calibrates)."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    # No max_intermediate_outputs: onnxruntime 1.32 drops (not merges) the outputs it collected when
    # that limit is hit. Feeding chunks of CALIB_CHUNK images per collect_data call bounds memory
    # the same way (every call reduces its chunk and merges with the ranges so far).
    op_types = list(set(QLinearOpsRegistry) | set(QDQRegistry))
    augmented = workdir / "augmented.onnx"
    calibrator = create_calibrator(pre_path, op_types, augmented_model_path=str(augmented),
                                   calibrate_method=calibration_method(method), extra_options={})
    # the calibrator's own session takes every core; use the same thread count as everything else
    if hasattr(calibrator, "infer_session"):
        calibrator.infer_session = session(augmented, threads=threads, optimize=False)
    inp = calibrator.infer_session.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else 1
    total = len(source)
    state = {"n": 0}

    def tick():
        state["n"] += 1
        emit(progress, "calibrate", state["n"], total)

    emit(progress, "calibrate", 0, total)
    items = iter(source)
    collected = 0
    while True:
        reader = _Reader(items, inp.name, batch, max(1, CALIB_CHUNK // batch), tick)
        first = reader.get_next()
        if first is None:
            break
        chunk = [first] + list(reader)
        collected += len(chunk)
        calibrator.collect_data(_ListReader(chunk))
    if collected == 0:
        raise no_calibration_images(source)
    ranges = calibrator.compute_data()
    cache = workdir / "calibration.json"
    save_tensors_data(ranges, cache)
    del calibrator
    return cache


def no_calibration_images(source) -> DataError:
    """The error for a calibration source that yielded nothing (naming the first corrupt file)."""
    skipped = getattr(source, "skipped", [])
    hint = f"; {len(skipped)} corrupt (first: {skipped[0][0]})" if skipped else ""
    return DataError(f"no readable calibration images{hint}; pass a folder of valid images")


def calibration_info(job) -> tuple[CalibrationInfo, list[str]]:
    """What the calibration of ``job`` read (after it ran), and the notes it deserves."""
    src, scan, pre = job.calib_src, job.calib_scan, job.target.preprocess
    requested = src.count if src.synthetic else src.limit
    info = CalibrationInfo("synthetic" if src.synthetic else str(scan.root), src.synthetic, len(src.used),
                           requested, src.digest(), scan.non_images if scan else 0, list(src.skipped),
                           pre.describe())
    notes = []
    if src.synthetic:
        notes.append("SYNTHETIC calibration (drawn shapes): a smoke run of the pipeline, not for shipping — "
                     "calibrate on real images from your domain")
    elif len(src.used) < requested:
        notes.append(f"calibrated on {len(src.used)} images ({requested} requested; the folder has "
                     "no more readable images)")
    return info, notes
