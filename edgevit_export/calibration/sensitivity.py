"""Per-layer sensitivity: the error int8 quantization injects, tensor by tensor.

Per quantized activation, the SQNR against itself before its QuantizeLinear/DequantizeLinear pair
(the local error, as onnxruntime's ``qdq_loss_debug`` computes it) and against the float model's
same tensor (the accumulated error); per quantized weight, the SQNR of its dequantized values. It
streams image by image (the debug tool keeps every activation of every image in memory, which at
1024² does not fit), and ranks candidates for keeping in float, worst first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..metrics import db, sqnr_db
from ..ort import session
from ..progress import Callback, emit


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
    # how much worse the accumulated error is right after this tensor's consumers than at it (dB):
    # a tensor whose Q/DQ looks harmless but ruins what is computed from it (an outlier channel
    # stretching a per-tensor scale) shows here, not in its own SQNR
    jump_db: float | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("sqnr_db", "xmodel_db", "jump_db"):
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = None
        return d


class _Acc:
    __slots__ = ("sig", "noise", "fsig", "fnoise")

    def __init__(self):
        self.sig = self.noise = self.fsig = self.fnoise = 0.0


def sensitivity(float_path: Path, qdq_path: Path, source: Iterable, workdir: Path, *, threads: int = 2,
                progress: Callback | None = None) -> list[Sensitivity]:
    """Per-tensor quantization error of ``qdq_path`` against ``float_path`` (the model it was
    quantized from, same node and tensor names), over the images of ``source``; worst first."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

    workdir.mkdir(parents=True, exist_ok=True)
    aug_f, aug_q = workdir / "float.debug.onnx", workdir / "int8.debug.onnx"
    modify_model_output_intermediate_tensors(str(float_path), str(aug_f))
    modify_model_output_intermediate_tensors(str(qdq_path), str(aug_q))

    # run exactly as written (the debug outputs must survive), interleaved: no spinning
    sf = session(aug_f, threads=threads, optimize=False, spinning=False)
    sq = session(aug_q, threads=threads, optimize=False, spinning=False)
    suffix = "_ReshapedSavedOutput"
    f_names = [o.name for o in sf.get_outputs()]
    q_names = [o.name for o in sq.get_outputs()]
    q_index = {n[: -len(suffix)]: i for i, n in enumerate(q_names) if n.endswith(suffix)}
    f_index = {n[: -len(suffix)]: i for i, n in enumerate(f_names) if n.endswith(suffix)}

    pairs = _qdq_pairs(q_index)
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
    emit(progress, "sensitivity", 0, total)
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
        emit(progress, "sensitivity", done, total)
    del sf, sq
    return _ranked(acc, fmodel, qmodel, producer, consumers)


def _qdq_pairs(q_index: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Tensor → (index of its value before Q/DQ, index after) among the int8 model's debug outputs."""
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX

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
    return pairs


def _ranked(acc: dict[str, _Acc], fmodel, qmodel, producer: dict, consumers: dict) -> list[Sensitivity]:
    """The candidates for keeping in float (activations with their producer and consumers,
    quantized weights with their users), worst SQNR first."""
    inits = {i.name for i in fmodel.graph.initializer}
    out: list[Sensitivity] = []
    for t, a in acc.items():
        if t in inits:
            continue
        p = producer.get(t)
        group = ([p.name] if p is not None and p.name else []) + [c.name for c in consumers.get(t, []) if c.name]
        if p is not None and p.op_type in ("Relu", "Clip") and p.input and p.input[0] in producer:
            group.insert(0, producer[p.input[0]].name)   # a fused activation: its input is quantized otherwise
        if not group:
            continue
        here = db(a.fsig, a.fnoise) if a.fsig > 0 else None
        jump = max((j for c in consumers.get(t, []) if (j := _jump(c, acc, inits, consumers)) is not None), default=None)
        out.append(Sensitivity("activation", t, p.op_type if p is not None else "input", db(a.sig, a.noise),
                               here, list(dict.fromkeys(group)), jump))
    for w, (fw, dq) in _weight_pairs(fmodel, qmodel).items():
        users = [c for c in consumers.get(w, []) if c.name]
        if not users or fw.size < 2:
            continue
        out.append(Sensitivity("weight", w, users[0].op_type, sqnr_db(fw, dq), None, [c.name for c in users]))
    out.sort(key=lambda s: (s.sqnr_db, s.tensor))
    return out


def _jump(node, acc: dict[str, _Acc], inits: set, consumers: dict) -> float | None:
    """How much worse the accumulated error is at ``node``'s outputs than at the worst of its
    activation inputs (dB): an error this node makes, not one its other inputs bring (a gate
    multiplied into an activation that is already off shows no jump). A Conv's output that a
    fused Relu/Clip quantizes is read after it."""
    def acc_db(names):
        return [db(acc[n].fsig, acc[n].fnoise) for n in names if n in acc and n not in inits and acc[n].fsig > 0]

    outputs = [o for o in node.output]
    for o in node.output:
        after = consumers.get(o, [])
        if o not in acc and len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
            outputs += list(after[0].output)
    ins, outs = acc_db(node.input), acc_db(outputs)
    if not ins or not outs or not all(math.isfinite(v) for v in ins):
        return None
    return min(ins) - min(outs)


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
