"""Static int8 LiteRT: PT2E quantization with litert-torch's quantizer, converted to ``.tflite``.

The same job as int8 ExecuTorch (:class:`.pte_int8.Pt2eInt8`: the format's pass pipeline, PT2E
prepare → calibrate → convert, sensitivity, keep-float, the accuracy gate on the saved artifact in
its runtime), with what LiteRT needs:

- litert-torch's ``PT2EQuantizer`` (int8 asymmetric activations, int8 symmetric weights per
  output channel or per tensor), and ``litert_torch.convert(…, quant_config=QuantConfig(
  pt2e_quantizer=…))``: without the quant config the converter keeps the Q/DQ pairs as fp32
  fake-quantization (4× the bytes, dozens of partitions).
- The quantizer finds adds and muls through ``source_fn_stack``, which our passes and the re-export
  drop: they are annotated by op type here, or they stay fp32 between a dequantize and a quantize,
  and the converter makes an int8 op of each that XNNPACK then refuses. Scalar operands become
  constants of the tensor's rank ([1, 1, 1, 1]): a 0-d constant keeps LiteRT's NHWC layout pass
  from taking the op and costs two TRANSPOSE around each.
- ``hardswish_as_relu6``: LiteRT's XNNPACK delegate takes HARD_SWISH only in float, so an int8
  hard-swish falls out of the delegate and cuts it (MobileNetV3-L: 14 pieces); as
  ``x · (relu6(x + 3) · 1/6)`` it is int8 adds and muls with the clamp absorbed by the ranges.
- Inputs and outputs stay float for the app (a QUANTIZE first and a DEQUANTIZE last, both inside
  the delegate), or int8 with ``--int8-io`` (the input's scale and zero point in the manifest).
  Float I/O uses the converter's ``strict_qdq_mode``, which litert-torch 0.10 does not expose:
  set for the one conversion (litert-torch is pinned).
"""

from __future__ import annotations

import contextlib

import torch
from torch.fx import Node

from ..exporters import tflite
from ..passes.base import written_by
from ..progress import Callback
from .pte_int8 import Pt2eInt8, Pt2eTarget
from .results import Job, QuantizeResult

aten = torch.ops.aten
SCHEME_TOOL = "torchao PT2E (prepare_pt2e, convert_pt2e) with litert-torch's PT2EQuantizer, LiteRT XNNPACK delegate"
_BINARY = (aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor)
# products of two activations and softmax stay fp32: LiteRT's XNNPACK delegate takes neither an int8
# BATCH_MATMUL nor an int8 SOFTMAX (which also needs an output scale of 1/256)
_FLOAT_SEEDS = (aten.einsum.default, aten.bmm.default, aten.matmul.default, aten.mm.default, aten.softmax.int,
                aten._softmax.default, aten.cat.default)
_FOLLOWS = _BINARY + (aten.relu.default, aten.hardtanh.default, aten.reshape.default, aten.view.default, aten.permute.default, aten.transpose.int,
                      aten.slice.Tensor, aten.contiguous.default, aten.clone.default, aten.flatten.using_ints)


def float_islands(graph) -> set:
    """The attention products, softmaxes and concatenations, and the elementwise and layout ops that
    follow them up to the next convolution or linear layer: left unannotated, they run in fp32
    inside the delegate (annotated, the converter would make int8 ops of them — BATCH_MATMUL,
    SOFTMAX, a RELU after a float concatenation — that XNNPACK refuses)."""
    out = set()
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _FLOAT_SEEDS or (n.target in _FOLLOWS and any(a in out for a in n.all_input_nodes)):
            out.add(n)
    return out


def _rank(n) -> int:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else 0


def quantizer(per_channel: bool, method: str, keep: set[str]):
    """litert-torch's PT2EQuantizer, int8 static, with adds/muls annotated by op type and what
    stays float (concatenations, decompose_norms' statistics, ``keep``) left unannotated."""
    from litert_torch.quantize import pt2e_quantizer_utils as U
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    class Quantizer(PT2EQuantizer):
        def transform_for_annotation(self, model):
            for n in list(model.graph.nodes):
                if n.op != "call_function" or n.target not in _BINARY:
                    continue
                r = max((_rank(a) for a in n.args), default=0)
                args = []
                for a in n.args:
                    if isinstance(a, Node) or not isinstance(a, (int, float)):
                        args.append(a)
                        continue
                    name = U.get_new_attr_name_with_prefix("_scalar_")(model)
                    model.register_buffer(name, torch.tensor(float(a)).reshape([1] * r))
                    with model.graph.inserting_before(n):
                        c = model.graph.create_node("get_attr", name, (), {})
                    c.meta["val"] = torch.empty([1] * r)
                    args.append(c)
                n.args = tuple(args)
            model.recompile()
            return model

        def annotate(self, model):
            model = super().annotate(model)
            act, out = U.get_input_act_qspec(self.global_config), U.get_output_act_qspec(self.global_config)
            for n in model.graph.nodes:
                if n.op != "call_function" or n.target not in _BINARY:
                    continue
                a = n.meta.get("quantization_annotation")
                if a is not None and a._annotated:
                    continue
                n.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={x: act for x in n.args if isinstance(x, Node)}, output_qspec=out, _annotated=True)
            U.propagate_annotation(model)
            islands = float_islands(model.graph)
            for n in model.graph.nodes:
                if n.op == "call_function" and (written_by(n) == "decompose_norms" or n.name in keep or n in islands):
                    n.meta.pop("quantization_annotation", None)
            return model

    if method != "histogram":   # litert-torch's default activation observer is the histogram one
        import dataclasses

        from torchao.quantization.pt2e import MinMaxObserver

        cfg = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=False)
        acts = dataclasses.replace(cfg.input_activation,
                                   observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
        cfg = dataclasses.replace(cfg, input_activation=acts, output_activation=acts)
    else:
        cfg = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=False)
    return Quantizer().set_global(cfg)


def fold_relu_into_quantize(gm):
    """``relu → quantize(zero_point = qmin)`` as the quantize alone: saturating at qmin is the relu,
    exactly, and the converter would otherwise emit an int8 RELU, which XNNPACK does not take
    (SHViT: the ReLU after each attention block's concatenation)."""
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    folded = 0
    for r in list(gm.graph.nodes):
        if r.op != "call_function" or r.target not in (aten.relu.default, aten.relu_.default):
            continue
        users = list(r.users)
        if not users or any(u.target is not quantize or u.args[2] != u.args[3] for u in users):
            continue
        for u in users:
            u.replace_input_with(r, r.args[0])
        gm.graph.erase_node(r)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return gm


@contextlib.contextmanager
def _float_io(enabled: bool):
    """The converter's ``strict_qdq_mode`` for one conversion: the model keeps float inputs and
    outputs (a QUANTIZE first, a DEQUANTIZE last) instead of becoming int8 at its boundaries."""
    if not enabled:
        yield
        return
    from litert_torch._convert import litert_converter as lc

    original = lc.converter_api_ext.run_convert_to_tfl_passes

    def strict(module, pass_manager, config):
        config.strict_qdq_mode = True
        return original(module, pass_manager, config)

    lc.converter_api_ext.run_convert_to_tfl_passes = strict
    try:
        yield
    finally:
        lc.converter_api_ext.run_convert_to_tfl_passes = original


def lower(int8_gm, example, path, q, opts) -> dict:
    from litert_torch.quantize.quant_config import QuantConfig

    with _float_io(not opts.int8_io):
        return tflite.convert_module(int8_gm, example, path, {"layout": "nchw"},
                                     quant_config=QuantConfig(pt2e_quantizer=q))


TFLITE = Pt2eTarget("tflite", "LiteRT", quantizer, lower, SCHEME_TOOL, extra_passes=("hardswish_as_relu6",),
                    fold_quantize=False,   # litert-torch reads the weights' quantize ops; folded int8 tensors fail
                    post_convert=fold_relu_into_quantize)


def quantize_tflite(job: Job, step: Callback | None) -> QuantizeResult:
    """Int8 LiteRT of ``job``, staged in ``job.tmp``."""
    return Pt2eInt8(job, step, TFLITE).run()
