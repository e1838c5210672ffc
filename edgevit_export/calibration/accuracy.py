"""What quantization cost: predictors run over the same images, and the figures that compare them.

- :func:`collect_logits` runs one or more predictors (an ONNX Runtime session, a torch module)
  over the same preprocessed images, once each image, with a progress callback.
- :func:`top_k` gives top-1/top-5 on labelled data; :func:`agreement` compares two sets of logits
  without labels (top-1 agreement, cosine similarity, SQNR in dB); :func:`compare` is both, float
  against quantized. Per-layer error is :mod:`.sensitivity`'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .. import metrics
from ..progress import Callback, emit


# --- predictors ------------------------------------------------------------------------------

class OrtPredictor:
    """An ONNX model run by onnxruntime (CPU EP, sequential, ``threads`` intra-op threads; no
    spinning, as predictors take turns on each batch)."""

    def __init__(self, path: str | Path, threads: int = 2):
        from ..ort import session

        self.path = Path(path)
        self.session = session(self.path, threads=threads, spinning=False)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        b = inp.shape[0]
        self.batch = b if isinstance(b, int) and b > 0 else None
        out = self.session.get_outputs()[0]
        self.num_classes = out.shape[-1] if isinstance(out.shape[-1], int) else None

    @property
    def resolution(self) -> tuple[int, int] | None:
        h, w = self.input_shape[2:4] if len(self.input_shape) == 4 else (None, None)
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _in_batches(lambda b: self.session.run(None, {self.input_name: b})[0], x, self.batch)


class ArtifactPredictor:
    """A saved artifact in its own runtime (a ``.pte`` in ExecuTorch, a ``.tflite`` in LiteRT; its
    static batch, ``threads`` threads)."""

    def __init__(self, path: str | Path, threads: int = 2):
        from ..exporters import of_artifact

        self.runner = of_artifact(path).backend().load(Path(path), threads)
        self.input_name = self.runner.inputs[0]["name"]
        self.output_name = self.runner.outputs[0]["name"]
        self.batch = self.runner.inputs[0]["shape"][0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _in_batches(lambda b: self.runner({self.input_name: b})[self.output_name], x, self.batch)


class CoreMLPredictor:
    """A Core ML package in the project's reference runner (fp16 programs computed in fp16, as on
    the phone): takes the normalised arrays the other predictors take and returns the logits (a
    classifier's are tapped where they enter its softmax). An image input takes raw pixels, so the
    arrays are mapped back with ``preprocess``'s mean/std first."""

    def __init__(self, path: str | Path, preprocess, threads: int = 2):
        from ..exporters.coreml_runner import CoreMLRunner

        self.runner = CoreMLRunner(path)
        inp = self.runner.inputs[0]
        self.input_name = inp["name"]
        self.image = inp.get("kind") == "image"
        self.mean = np.asarray(preprocess.mean, np.float32)[:, None, None]
        self.std = np.asarray(preprocess.std, np.float32)[:, None, None]
        self.batch = inp["shape"][0] if inp.get("shape") else None
        self.tap = self.runner.logits_var
        self.output = None if self.tap else next(o["name"] for o in self.runner.outputs if o["dtype"] != "str")
        self.threads = threads

    def _one(self, b: np.ndarray) -> np.ndarray:
        if self.image:
            b = np.clip((b * self.std + self.mean) * 255.0, 0, 255).astype(np.float32)
        out = self.runner({self.input_name: b}, taps=(self.tap,) if self.tap else ())
        return out[self.tap or self.output]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return _in_batches(self._one, x, self.batch)
        finally:
            torch.set_num_threads(old)


class TorchPredictor:
    """A torch module (or the GraphModule of an exported program; ``batch`` for a static batch)."""

    def __init__(self, model, threads: int | None = None, batch: int | None = None):
        try:
            model.eval()
        except NotImplementedError:  # ExportedProgram.module() is always in inference mode
            pass
        self.model = model
        self.threads = threads
        self.batch = batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        old = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                return _in_batches(lambda b: self.model(torch.from_numpy(b)).float().numpy(), x, self.batch)
        finally:
            torch.set_num_threads(old)


def _in_batches(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int | None) -> np.ndarray:
    """``run(x)``; with a static ``batch``, on chunks of exactly that many images (the last one
    padded with copies, whose outputs are dropped)."""
    if batch is None:
        return run(x)
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(run(chunk)[:n])
    return np.concatenate(outs)


@dataclass
class Logits:
    values: dict[str, np.ndarray]          # predictor name → (N, C)
    labels: np.ndarray | None              # (N,) or None without labels
    keys: list[str]                        # image ids, in order
    skipped: list[tuple[str, str]]         # corrupt files: (path, reason)
    seconds: float


def collect_logits(predictors: dict[str, Callable[[np.ndarray], np.ndarray]], source: Iterable, *,
                   batch: int = 8, progress: Callback | None = None, task: str = "evaluate") -> Logits:
    """Run every predictor on every image of ``source`` (items with .key, .x, .label)."""
    t0 = time.perf_counter()
    total = len(source) if hasattr(source, "__len__") else 0
    outs: dict[str, list[np.ndarray]] = {k: [] for k in predictors}
    labels: list[int | None] = []
    keys: list[str] = []
    buf: list = []
    done = 0

    def flush():
        nonlocal done
        if not buf:
            return
        x = np.stack([it.x for it in buf])
        for name, fn in predictors.items():
            outs[name].append(np.asarray(fn(x), dtype=np.float32).reshape(len(buf), -1))
        labels.extend(it.label for it in buf)
        keys.extend(it.key for it in buf)
        done += len(buf)
        buf.clear()
        emit(progress, task, done, total)

    emit(progress, task, 0, total)
    for item in source:
        buf.append(item)
        if len(buf) >= batch:
            flush()
    flush()
    if done != total:   # corrupt images skipped: the bar ends at what was read
        emit(progress, task, done, done)
    skipped = list(getattr(source, "skipped", []))
    values = {k: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for k, v in outs.items()}
    lab = None
    if labels and all(y is not None for y in labels):
        lab = np.asarray(labels, np.int64)
    return Logits(values, lab, keys, skipped, time.perf_counter() - t0)


# --- metrics ---------------------------------------------------------------------------------

@dataclass
class TopK:
    images: int
    top1: float          # percent
    top5: float          # percent (top-k with k = min(5, classes))
    k: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Agreement:
    images: int
    top1_agree: float    # percent of images whose argmax matches the reference's
    cosine: float        # mean per-image cosine similarity of logits
    min_cosine: float
    sqnr_db: float       # 10·log10(Σ ref² / Σ (ref − x)²) over all logits

    def as_dict(self) -> dict:
        return asdict(self)


def top_k(logits: np.ndarray, labels: np.ndarray) -> TopK:
    n, c = logits.shape
    k = min(5, c)
    order = np.argsort(-logits, axis=1)
    top1 = float((order[:, 0] == labels).mean() * 100) if n else 0.0
    topk = float((order[:, :k] == labels[:, None]).any(1).mean() * 100) if n else 0.0
    return TopK(n, top1, topk, k)


def agreement(ref: np.ndarray, x: np.ndarray) -> Agreement:
    cos = metrics.cosine(ref, x)
    return Agreement(len(ref), metrics.top1_agreement(ref, x) * 100, float(cos.mean()) if len(ref) else 0.0,
                     float(cos.min()) if len(ref) else 0.0, metrics.sqnr_db(ref, x))


@dataclass
class Comparison:
    """Float vs quantized on one evaluation set: the figures a user asks for."""

    reference: str
    candidate: str
    images: int
    labelled: bool
    float_topk: TopK | None
    quant_topk: TopK | None
    agreement: Agreement

    @property
    def drop(self) -> float:
        """Top-1 drop in points with labels; without labels, top-1 disagreement in percent."""
        if self.labelled:
            return self.float_topk.top1 - self.quant_topk.top1
        return 100.0 - self.agreement.top1_agree

    @property
    def drop_label(self) -> str:
        return "top-1 drop (points)" if self.labelled else "top-1 disagreement with float (%)"

    def as_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "images": self.images,
                "labelled": self.labelled, "drop": self.drop, "drop_metric": self.drop_label,
                "float": self.float_topk.as_dict() if self.float_topk else None,
                "quantized": self.quant_topk.as_dict() if self.quant_topk else None,
                "agreement": self.agreement.as_dict()}


def compare(ref: np.ndarray, x: np.ndarray, labels: np.ndarray | None, reference: str = "float",
            candidate: str = "int8") -> Comparison:
    lab = labels is not None
    return Comparison(reference, candidate, len(ref), lab, top_k(ref, labels) if lab else None,
                      top_k(x, labels) if lab else None, agreement(ref, x))

