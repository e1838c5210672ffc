"""Compressed constants (``constexpr_*`` of iOS16 and iOS18), decompressed once, at load time,
with numpy: linear dequantisation, look-up tables, sparse masks, bit-packed indices."""

from __future__ import annotations

import math

import numpy as np

from .base import UnsupportedOp, _dtype_name
from .ops import _axis



def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Indices packed LSB first, one byte at a time (coremltools' layout) → uint8 values."""
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8).reshape(-1), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.uint16)
    return (bits << np.arange(nbits, dtype=np.uint16)).sum(axis=1).astype(np.uint8)


def _broadcast_axis(p: np.ndarray, rank: int, axis: int) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim == 0 or p.size == 1:
        return p.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return p.reshape(shape)


def _repeat_blocks(p: np.ndarray, shape) -> np.ndarray:
    p = np.asarray(p)
    for d, (n, m) in enumerate(zip(shape, p.shape)):
        if m != n:
            p = np.repeat(p, n // m, axis=d)
    return p


def _decompress(op, np_consts: dict) -> list[np.ndarray]:
    t = op.op_type
    iv = op.inputs

    def c(k):
        x = iv.get(k)
        if x is None:
            return None
        if x.name in np_consts:
            return np_consts[x.name]
        return x.val

    out_dt = [_dtype_name(o) for o in op.outputs]
    np_out = [np.float16 if d == "fp16" else (np.float32 if d == "fp32" else None) for d in out_dt]
    if t == "constexpr_affine_dequantize":
        q = np.asarray(c("quantized_data"))
        rank = q.ndim
        ax = _axis(c("axis"), rank)
        zp = _broadcast_axis(c("zero_point"), rank, ax).astype(np.float32)
        sc = _broadcast_axis(c("scale"), rank, ax).astype(np.float32)
        return [((q.astype(np.float32) - zp) * sc).astype(np_out[0])]
    if t == "constexpr_cast":
        return [np.asarray(c("source_val")).astype(np_out[0])]
    if t == "constexpr_lut_to_dense":
        lut, idx = np.asarray(c("lut")), np.asarray(c("indices"))
        if "shape" in iv and iv["shape"] is not None:      # iOS16: a flat LUT, indices packed in bytes
            shape = [int(s) for s in np.asarray(c("shape")).reshape(-1)]
            nbits = int(round(math.log2(lut.size)))
            ix = _unpack_bits(idx, nbits, int(np.prod(shape)))
            return [lut.reshape(-1)[ix.astype(np.int64)].reshape(shape).astype(np_out[0] or lut.dtype)]
        return [_lut_blockwise(idx, lut, c("vector_axis")).astype(np_out[0] or lut.dtype)]
    if t == "constexpr_blockwise_shift_scale":
        data = np.asarray(c("data"))
        scale = np.asarray(c("scale")).astype(np.float32)
        off = c("offset")
        d = data.astype(np.float32)
        if off is not None:
            d = d - _repeat_blocks(np.asarray(off).astype(np.float32), data.shape)
        return [(d * _repeat_blocks(scale, data.shape)).astype(np_out[0])]
    if t == "constexpr_sparse_to_dense":
        nz = np.asarray(c("nonzero_data"))
        mask = np.asarray(c("mask"))
        if "shape" in iv and iv["shape"] is not None:      # iOS16: a packed bit mask
            shape = [int(s) for s in np.asarray(c("shape")).reshape(-1)]
            m = _unpack_bits(mask, 1, int(np.prod(shape))).reshape(shape)
        else:
            m = mask
        dense = np.zeros(m.shape, dtype=nz.dtype)
        dense[m != 0] = nz.reshape(-1)
        return [dense]
    if t == "constexpr_lut_to_sparse":
        mask = np.asarray(c("indices_mask"))
        nzi = np.asarray(c("indices_nonzero_data"))
        lut = np.asarray(c("lut"))
        va = c("vector_axis")
        dense_idx = np.zeros(mask.shape, dtype=np.uint8)
        dense_idx[mask != 0] = nzi.reshape(-1)
        vals = _lut_blockwise(dense_idx, lut, va)
        m = mask
        if va is not None and lut.shape[-1] > 1:
            m = np.repeat(mask, lut.shape[-1], axis=int(va))
        return [m, vals[m != 0].reshape(-1)]
    if t == "constexpr_sparse_blockwise_shift_scale":
        mask = np.asarray(c("data_mask"))
        nz = np.asarray(c("nonzero_data"))
        scale = np.asarray(c("scale")).astype(np.float32)
        off = c("offset")
        d = np.zeros(mask.shape, np.float32)
        d[mask != 0] = nz.reshape(-1).astype(np.float32)
        if off is not None:
            d = d - _repeat_blocks(np.asarray(off).astype(np.float32), mask.shape)
        d = d * _repeat_blocks(scale, mask.shape)
        return [mask, d[mask != 0].reshape(-1).astype(np_out[1])]
    raise UnsupportedOp(t, op.name)


def _lut_blockwise(indices: np.ndarray, lut: np.ndarray, vector_axis) -> np.ndarray:
    """iOS18 LUT: ``lut`` has rank(indices) + 2 dims (blocks…, palette, vector)."""
    idx = np.asarray(indices).astype(np.int64)
    rank = idx.ndim
    vec = lut.shape[-1]
    # expand each block's table over its block so every index position sees its own table
    tables = lut
    for d in range(rank):
        if tables.shape[d] != idx.shape[d]:
            tables = np.repeat(tables, idx.shape[d] // tables.shape[d], axis=d)
    vals = np.take_along_axis(tables, idx[..., None, None], axis=rank)[..., 0, :]   # (*idx.shape, vec)
    if vec == 1:
        return vals[..., 0]
    va = _axis(vector_axis, rank)
    vals = np.moveaxis(vals, -1, va + 1)                                           # vector right after its axis
    shape = list(idx.shape)
    shape[va] *= vec
    return vals.reshape(shape)
