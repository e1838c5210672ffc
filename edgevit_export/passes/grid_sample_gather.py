"""grid_sample_gather: bilinear ``grid_sample`` (zeros outside, ``align_corners=True``) as one row
gather from the feature map laid out as (N·H·W, C), then a four-corner blend.

litert-torch lowers ``grid_sampler_2d`` through PyTorch's decomposition: the corner indices
broadcast over every channel, four element-wise GATHER_ND with int64 indices, and compare/select
masks on C×P tensors, all outside the XNNPACK delegate. LITv2's deformable token merging spends
58% of the model's LiteRT time there (DTM 1 at 224: 136 ms in LiteRT against 13.5 ms in
onnxruntime). Written here, the corner weights, validity and (clamped) flat row indices are
computed on the P sample points only; one GATHER takes 4·P rows of C channels; the corners are
weighted and summed in the decomposition's order. Outside the delegate remain a float→int CAST,
the GATHER and a reshape per sampling (XNNPACK has neither gather nor casts).

Exact: unnormalising uses the CPU kernel's ``(g + 1) · ((W − 1) / 2)``; validity of an integer
index v in [0, n − 1] is ``(relu(v + 1) − relu(v)) · (relu(n − v) − relu(n − 1 − v))`` (a clamp
would become RELU_0_TO_1, which XNNPACK refuses), exact for |v| < 2²⁴.

The gather is LiteRT's own (``torch.ops.tfl.gather`` from litert-torch): this pass belongs to the
``tflite`` pipeline only, and refuses where litert-torch is not installed.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import Pass, PassContext, PassRefused, aten, replace_node

_GRID_OPS = (aten.grid_sampler.default, aten.grid_sampler_2d.default)
_BILINEAR, _ZEROS = 0, 0


def _tfl_gather():
    try:
        import litert_torch.backend.experimental.torch_tfl  # noqa: F401  registers torch.ops.tfl.*
    except ImportError:
        raise PassRefused("needs litert-torch (LiteRT's GATHER op): pip install 'edgevit-export[tflite]'") from None
    return torch.ops.tfl.gather


def _step(v):
    """1 where the integer-valued ``v`` ≥ 0, else 0 (RELU and SUB: both inside XNNPACK)."""
    return torch.relu(v + 1) - torch.relu(v)


def _inside(v, n: int):
    """1 where the integer-valued ``v`` is in [0, n − 1], else 0."""
    return _step(v) * _step((n - 1) - v)


def grid_sample_rows(inp: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(inp, grid, "bilinear", "zeros", align_corners=True)`` as NHWC (N, Hg, Wg, C)."""
    n, c, h, w = inp.shape
    _, hg, wg, _ = grid.shape
    gx, gy = grid[..., 0].reshape(-1), grid[..., 1].reshape(-1)
    ix, iy = (gx + 1) * ((w - 1) / 2), (gy + 1) * ((h - 1) / 2)
    x0, y0 = ix.floor(), iy.floor()
    x1, y1 = x0 + 1, y0 + 1
    ax0, ax1 = (x1 - ix) * _inside(x0, w), (ix - x0) * _inside(x1, w)
    ay0, ay1 = (y1 - iy) * _inside(y0, h), (iy - y0) * _inside(y1, h)
    weights = torch.stack((ax0 * ay0, ax1 * ay0, ax0 * ay1, ax1 * ay1))             # nw, ne, sw, se: (4, P)
    cx0, cx1 = x0.clamp(0, w - 1), x1.clamp(0, w - 1)
    r0, r1 = y0.clamp(0, h - 1) * w, y1.clamp(0, h - 1) * w
    rows = torch.stack((r0 + cx0, r0 + cx1, r1 + cx0, r1 + cx1)).to(torch.int32)   # whole numbers < 2^24
    if n > 1:
        rows = rows + (torch.arange(n, dtype=torch.int32) * (h * w)).repeat_interleave(hg * wg)
    src = inp.permute(0, 2, 3, 1).reshape(n * h * w, c)
    corners = _tfl_gather()(src, rows.reshape(-1), 0).reshape(4, n * hg * wg, c) * weights.unsqueeze(-1)
    out = ((corners[0] + corners[1]) + corners[2]) + corners[3]
    return out.reshape(n, hg, wg, c)


class GridSampleGather(Pass):
    name = "grid_sample_gather"
    summary = "bilinear grid_sample as one row GATHER of the NHWC map + blend (LiteRT: no per-channel GATHER_ND)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        targets = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _GRID_OPS
                   and tuple(n.args[2:5]) == (_BILINEAR, _ZEROS, True)]
        if not targets:
            return 0
        _tfl_gather()
        for n in targets:
            with gm.graph.inserting_before(n):
                nhwc = gm.graph.call_function(grid_sample_rows, tuple(n.args[:2]))
                out = gm.graph.call_function(aten.permute.default, (nhwc, [0, 3, 1, 2]))
            replace_node(n, out)
        return len(targets)
