"""What quantization cost: accuracy on labelled data, agreement without labels, per-layer error.

- :func:`collect_logits` runs one or more predictors (an ONNX Runtime session, a torch module)
  over the same preprocessed images, once each image, with a progress callback.
- :func:`top_k` gives top-1/top-5 on labelled data; :func:`agreement` compares two sets of logits
  without labels (top-1 agreement, cosine similarity, SQNR in dB).
- :func:`sensitivity` measures, per tensor, the error that int8 quantization injects: the SQNR of
  each quantized activation against itself before its QuantizeLinear/DequantizeLinear pair (the
  local error, as onnxruntime's ``qdq_loss_debug`` computes it) and against the float model's
  same tensor (the accumulated error), and the SQNR of each quantized weight. It streams image by
  image (the debug tool keeps every activation of every image in memory, which at 1024² does not
  fit), and ranks candidates for keeping in float, worst first.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

Progress = Callable[[str, int, int], None]


# --- predictors ------------------------------------------------------------------------------

class OrtPredictor:
    """An ONNX model run by onnxruntime (CPU EP, sequential, ``threads`` intra-op threads)."""

    def __init__(self, path: str | Path, threads: int = 2):
        from ..exporters.onnx import ort_session

        self.path = Path(path)
        self.session = ort_session(self.path, threads=threads)
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
        if self.batch is None:
            return self.session.run(None, {self.input_name: x})[0]
        outs = []
        for i in range(0, len(x), self.batch):
            chunk = x[i:i + self.batch]
            n = len(chunk)
            if n < self.batch:  # static batch: pad with copies, drop their outputs
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
            outs.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        return np.concatenate(outs)


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
                if self.batch is None:
                    return self.model(torch.from_numpy(x)).float().numpy()
                outs = []
                for i in range(0, len(x), self.batch):
                    chunk = x[i:i + self.batch]
                    n = len(chunk)
                    if n < self.batch:
                        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
                    outs.append(self.model(torch.from_numpy(chunk)).float().numpy()[:n])
                return np.concatenate(outs)
        finally:
            torch.set_num_threads(old)


@dataclass
class Logits:
    values: dict[str, np.ndarray]          # predictor name → (N, C)
    labels: np.ndarray | None              # (N,) or None without labels
    keys: list[str]                        # image ids, in order
    skipped: list[tuple[str, str]]         # corrupt files: (path, reason)
    seconds: float


def collect_logits(predictors: dict[str, Callable[[np.ndarray], np.ndarray]], source: Iterable, *,
                   batch: int = 8, progress: Progress | None = None, task: str = "evaluate") -> Logits:
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
        if progress:
            progress(task, done, total)

    if progress:
        progress(task, 0, total)
    for item in source:
        buf.append(item)
        if len(buf) >= batch:
            flush()
    flush()
    if progress and done != total:   # corrupt images skipped: the bar ends at what was read
        progress(task, done, done)
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


def sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(((ref - x.astype(np.float64)) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def agreement(ref: np.ndarray, x: np.ndarray) -> Agreement:
    a, b = ref.astype(np.float64), x.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return Agreement(len(a), float((a.argmax(1) == b.argmax(1)).mean() * 100) if len(a) else 0.0,
                     float(cos.mean()) if len(a) else 0.0, float(cos.min()) if len(a) else 0.0, sqnr_db(a, b))


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


# --- per-layer sensitivity -------------------------------------------------------------------

@dataclass
class Sensitivity:
    """One candidate for keeping in float: a quantized activation (its producer and consumers
    must all stay float for it to lose its Q/DQ pair) or a quantized weight (its node)."""

    kind: str                  # "activation" | "weight"
    tensor: str
    op_type: str               # producer's op type (activation) or consumer's (weight)
    sqnr_db: float             # local: after vs before its own Q/DQ (weights: dequantized vs float)
    xmodel_db: float | None    # accumulated: int8 model vs float model at this tensor (activations)
    nodes: list[str] = field(default_factory=list)   # nodes to keep in float to remove this error

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("sqnr_db", "xmodel_db"):
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = None
        return d


class _Acc:
    __slots__ = ("sig", "noise", "fsig", "fnoise")

    def __init__(self):
        self.sig = self.noise = self.fsig = self.fnoise = 0.0


def _db(sig: float, noise: float) -> float:
    if noise <= 0.0:
        return math.inf
    return 10.0 * math.log10(max(sig, 1e-300) / noise)


def sensitivity(float_path: Path, qdq_path: Path, source: Iterable, workdir: Path, *, threads: int = 2,
                progress: Progress | None = None) -> list[Sensitivity]:
    """Per-tensor quantization error of ``qdq_path`` against ``float_path`` (the model it was
    quantized from, same node and tensor names), over the images of ``source``; worst first."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX

    workdir.mkdir(parents=True, exist_ok=True)
    aug_f, aug_q = workdir / "float.debug.onnx", workdir / "int8.debug.onnx"
    modify_model_output_intermediate_tensors(str(float_path), str(aug_f))
    modify_model_output_intermediate_tensors(str(qdq_path), str(aug_q))

    def session(p: Path):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(str(p), sess_options=so, providers=["CPUExecutionProvider"])

    sf, sq = session(aug_f), session(aug_q)
    suffix = "_ReshapedSavedOutput"
    f_names = [o.name for o in sf.get_outputs()]
    q_names = [o.name for o in sq.get_outputs()]
    q_index = {n[: -len(suffix)]: i for i, n in enumerate(q_names) if n.endswith(suffix)}
    f_index = {n[: -len(suffix)]: i for i, n in enumerate(f_names) if n.endswith(suffix)}

    # (tensor) → (index of pre-QDQ value, index of post-QDQ value) in the int8 model's outputs
    pairs: dict[str, tuple[int, int]] = {}
    for name, i in q_index.items():
        if name.endswith(DEQUANT_OUTPUT_SUFFIX):
            base = name[: -len(DEQUANT_OUTPUT_SUFFIX)]
            if base in q_index:
                pairs[base] = (q_index[base], i)
        elif name.endswith(QUANT_INPUT_SUFFIX):   # graph outputs: T_QuantizeInput → Q/DQ → T
            base = name[: -len(QUANT_INPUT_SUFFIX)]
            if base in q_index:
                pairs[base] = (i, q_index[base])
        elif name.endswith(DEQUANT_OUTPUT_SUFFIX + "_1"):
            base = name[: -len(DEQUANT_OUTPUT_SUFFIX) - 2]
            if base in q_index and base not in pairs:
                pairs[base] = (q_index[base], i)
    in_name_f = sf.get_inputs()[0].name
    in_name_q = sq.get_inputs()[0].name
    acc = {t: _Acc() for t in pairs}

    fmodel = onnx.load(str(float_path), load_external_data=False)
    qmodel = onnx.load(str(qdq_path), load_external_data=False)
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in fmodel.graph.node:
        for o in n.output:
            producer[o] = n
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    q_nodes = {n.name for n in qmodel.graph.node}
    # The quantizer folds a Relu into the Q/DQ that follows it (uint8 with zero point 0 clamps the
    # same way): the tensor before Q/DQ is then the Relu's input. Compare against relu(pre).
    folded_relu = {t for t in pairs if t in producer and producer[t].op_type == "Relu"
                   and producer[t].name not in q_nodes}
    total = len(source) if hasattr(source, "__len__") else 0
    done = 0
    if progress:
        progress("sensitivity", 0, total)
    for item in source:
        x = item.x[None]
        fo = sf.run(None, {in_name_f: x})
        qo = sq.run(None, {in_name_q: x})
        for t, (ipre, ipost) in pairs.items():
            pre = qo[ipre].astype(np.float64)
            if t in folded_relu:
                pre = np.maximum(pre, 0.0)
            post = qo[ipost].astype(np.float64)
            a = acc[t]
            a.sig += float((pre ** 2).sum())
            a.noise += float(((pre - post) ** 2).sum())
            if t in f_index:
                fv = fo[f_index[t]].astype(np.float64)
                if fv.shape == post.shape:
                    a.fsig += float((fv ** 2).sum())
                    a.fnoise += float(((fv - post) ** 2).sum())
        done += 1
        if progress:
            progress("sensitivity", done, total)
    del sf, sq

    inits = {i.name for i in fmodel.graph.initializer}

    out: list[Sensitivity] = []
    for t, a in acc.items():
        if t in inits:
            continue
        p = producer.get(t)
        group = ([p.name] if p is not None and p.name else []) + [c.name for c in consumers.get(t, []) if c.name]
        if not group:
            continue
        out.append(Sensitivity("activation", t, p.op_type if p is not None else "input", _db(a.sig, a.noise),
                               _db(a.fsig, a.fnoise) if a.fsig > 0 else None, list(dict.fromkeys(group))))
    for w, (fw, dq) in _weight_pairs(fmodel, qmodel).items():
        users = [c for c in consumers.get(w, []) if c.name]
        if not users or fw.size < 2:
            continue
        out.append(Sensitivity("weight", w, users[0].op_type, sqnr_db(fw, dq), None, [c.name for c in users]))
    out.sort(key=lambda s: (s.sqnr_db, s.tensor))
    return out


def _weight_pairs(fmodel, qmodel) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Float initializer → (float values, dequantized int8 values), for every quantized weight.

    (onnxruntime's ``create_weight_matching`` ignores zero points, which misreads uint8 constants.)
    """
    from onnx import numpy_helper

    f_init = {i.name: i for i in fmodel.graph.initializer}
    q_init = {i.name: i for i in qmodel.graph.initializer}
    out = {}
    for n in qmodel.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in q_init:
            continue
        base = n.input[0][: -len("_quantized")] if n.input[0].endswith("_quantized") else n.input[0]
        if base not in f_init:
            continue
        q = numpy_helper.to_array(q_init[n.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(q_init[n.input[1]]).astype(np.float64)
        zp = (numpy_helper.to_array(q_init[n.input[2]]).astype(np.float64)
              if len(n.input) > 2 and n.input[2] in q_init else np.zeros_like(scale))
        if scale.ndim == 0 or scale.size == 1:
            deq = (q - zp.reshape(())) * scale.reshape(())
        else:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            deq = (q - zp.reshape(shape)) * scale.reshape(shape)
        out[base] = (numpy_helper.to_array(f_init[base]).astype(np.float64), deq)
    return out
