"""Kernels, part 2: tensor layout (reshape, slicing, concat, gather, …), resizing and sampling
(``resample`` = grid sampling), attention, top-k."""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from .ops import _axis, _op, _torch_pad_arg


# --- tensor layout ------------------------------------------------------------------------------

@_op("reshape")
def _reshape(v):
    ix = v.arg("x")
    xs = v.in_shape("x")
    if v.is_const("shape"):
        shape = [int(s) for s in np.asarray(v.val("shape")).reshape(-1)]
        if xs is not None and len(shape) == len(xs):
            shape = [xs[d] if s == 0 else s for d, s in enumerate(shape)]
        return lambda a: torch.reshape(a[ix], shape)
    ishape = v.arg("shape")

    def run(a):
        x = a[ix]
        shape = [int(s) for s in a[ishape].reshape(-1).tolist()]
        if len(shape) == x.dim():
            shape = [x.shape[d] if s == 0 else s for d, s in enumerate(shape)]
        return torch.reshape(x, shape)
    return run


@_op("transpose")
def _transpose(v):
    ix = v.arg("x")
    perm = [int(p) for p in np.asarray(v.val("perm")).reshape(-1)]
    return lambda a: a[ix].permute(perm)


@_op("squeeze")
def _squeeze(v):
    ix = v.arg("x")
    axes = v.val("axes")
    if axes is None:
        return lambda a: torch.squeeze(a[ix])
    rank = len(v.in_shape("x"))
    dims = tuple(_axis(x, rank) for x in np.asarray(axes).reshape(-1))
    return lambda a: torch.squeeze(a[ix], dim=dims)


@_op("expand_dims")
def _expand_dims(v):
    ix = v.arg("x")
    rank = len(v.in_shape("x"))
    axes = [int(x) for x in np.asarray(v.val("axes")).reshape(-1)]
    out_rank = rank + len(axes)
    dims = sorted(x + out_rank if x < 0 else x for x in axes)

    def run(a):
        x = a[ix]
        for d in dims:
            x = x.unsqueeze(d)
        return x
    return run


@_op("concat")
def _concat(v):
    idx = v.args("values")
    first = v.var("values")[0]
    rank = len(first.shape)
    ax = _axis(v.val("axis"), max(rank, 1))
    inter = bool(v.val("interleave", False))
    if inter:
        def run_i(a):
            xs = [a[i] for i in idx]
            st = torch.stack(xs, dim=ax + 1)
            shape = list(xs[0].shape)
            shape[ax] *= len(xs)
            return st.reshape(shape)
        return run_i
    return lambda a: torch.cat([a[i] if a[i].dim() else a[i].reshape(1) for i in idx], dim=ax)


@_op("stack")
def _stack(v):
    idx = v.args("values")
    ax = int(v.val("axis"))
    return lambda a: torch.stack([a[i] for i in idx], dim=ax)


@_op("split")
def _split(v):
    ix = v.arg("x")
    xs = v.in_shape("x")
    ax = _axis(v.val("axis"), len(xs))
    if v.has("split_sizes"):
        sizes = [int(s) for s in np.asarray(v.val("split_sizes")).reshape(-1)]
    else:
        n = int(v.val("num_splits"))
        sizes = [xs[ax] // n] * n
    return lambda a: tuple(torch.split(a[ix], sizes, dim=ax))


def _python_slices(shape, begin, end, stride, bmask, emask, smask):
    """Per axis (start, stop, step) as numpy would slice, plus the axes to squeeze."""
    rank = len(shape)
    stride = [1] * rank if stride is None else [int(s) for s in stride]
    bmask = [False] * rank if bmask is None else [bool(b) for b in bmask]
    emask = [False] * rank if emask is None else [bool(b) for b in emask]
    smask = [False] * rank if smask is None else [bool(b) for b in smask]
    out, squeeze = [], []
    for d in range(rank):
        b = None if bmask[d] else int(begin[d])
        e = None if emask[d] else int(end[d])
        s = stride[d]
        if smask[d]:
            e, s = None, np.iinfo(np.int32).max
            squeeze.append(d)
        out.append(slice(b, e, s).indices(shape[d]))
    return out, squeeze


def _apply_slices(x, slices, squeeze):
    for d, (start, stop, step) in enumerate(slices):
        n = x.shape[d]
        if step > 0:
            if start == 0 and stop >= n and step == 1:
                continue
            if stop <= start:
                x = x.narrow(d, 0, 0)
                continue
            x = x.narrow(d, start, stop - start)
            if step > 1:
                x = x[(slice(None),) * d + (slice(None, None, step),)]
        else:
            idx = torch.arange(start, stop, step, dtype=torch.long)
            x = x.index_select(d, idx)
    if squeeze:
        x = x.squeeze(tuple(squeeze)) if len(squeeze) > 1 else x.squeeze(squeeze[0])
    return x


@_op("slice_by_index")
def _slice_by_index(v):
    ix = v.arg("x")
    xs = v.in_shape("x")
    rank = len(xs)
    begin = np.asarray(v.val("begin")).reshape(-1)
    end = np.asarray(v.val("end")).reshape(-1)
    stride = v.val("stride")
    slices, squeeze = _python_slices(xs, begin, end, None if stride is None else np.asarray(stride).reshape(-1),
                                     v.val("begin_mask"), v.val("end_mask"), v.val("squeeze_mask"))
    assert len(slices) == rank
    return lambda a: _apply_slices(a[ix], slices, squeeze)


@_op("slice_by_size")
def _slice_by_size(v):
    ix = v.arg("x")
    xs = v.in_shape("x")
    begin = [int(b) for b in np.asarray(v.val("begin")).reshape(-1)]
    size = [int(s) for s in np.asarray(v.val("size")).reshape(-1)]
    slices = []
    for d, (b, s) in enumerate(zip(begin, size)):
        b = b + xs[d] if b < 0 else b
        slices.append((b, xs[d] if s == -1 else b + s, 1))
    return lambda a: _apply_slices(a[ix], slices, [])


@_op("crop")
def _crop(v):
    ix = v.arg("x")
    xs = v.in_shape("x")
    ch = [int(c) for c in np.asarray(v.val("crop_height")).reshape(-1)]
    cw = [int(c) for c in np.asarray(v.val("crop_width")).reshape(-1)]
    r = len(xs)
    slices = [(0, n, 1) for n in xs[:-2]] + [(ch[0], xs[-2] - ch[1], 1), (cw[0], xs[-1] - cw[1], 1)]
    assert len(slices) == r
    return lambda a: _apply_slices(a[ix], slices, [])


@_op("tile")
def _tile(v):
    ix = v.arg("x")
    reps = [int(r) for r in np.asarray(v.val("reps")).reshape(-1)]
    return lambda a: a[ix].repeat(reps)


@_op("pad")
def _pad(v):
    ix = v.arg("x")
    pad = [int(p) for p in np.asarray(v.val("pad")).reshape(-1)]
    mode = str(v.val("mode", "constant"))
    cval = float(v.val("constant_val", 0.0))
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]
    arg = _torch_pad_arg(pairs)
    n = len(pairs)
    tmode = {"constant": "constant", "reflect": "reflect", "replicate": "replicate"}.get(mode)
    if tmode is None:
        raise v.unsupported(f"has unknown mode '{mode}'")
    if tmode == "constant":
        return lambda a: F.pad(a[ix], arg, value=cval)

    def run(a):
        x = a[ix]
        # torch pads the last 1-3 dims of a batched tensor in these modes: trim zero pairs, add dims
        keep = n
        while keep > 0 and pairs[len(pairs) - keep] == (0, 0):
            keep -= 1
        if keep == 0:
            return x
        sub = _torch_pad_arg(pairs[len(pairs) - keep:])
        lead = x.shape[:x.dim() - keep]
        y = x.reshape((1, -1) + tuple(x.shape[x.dim() - keep:]))
        y = F.pad(y, sub, mode=tmode)
        return y.reshape(tuple(lead) + tuple(y.shape[2:]))
    return run


@_op("gather")
def _gather(v):
    ix, ii = v.arg("x"), v.arg("indices")
    xs = v.in_shape("x")
    ax = _axis(v.val("axis", 0), len(xs))
    if int(v.val("batch_dims", 0)) != 0:
        raise v.unsupported("has batch_dims != 0")

    def run(a):
        x, idx = a[ix], a[ii].long()
        n = x.shape[ax]
        idx = torch.where(idx < 0, idx + n, idx)
        out = x.index_select(ax, idx.reshape(-1))
        return out.reshape(tuple(x.shape[:ax]) + tuple(idx.shape) + tuple(x.shape[ax + 1:]))
    return run


@_op("gather_along_axis")
def _gather_along_axis(v):
    ix, ii = v.arg("x"), v.arg("indices")
    ax = _axis(v.val("axis", 0), len(v.in_shape("x")))

    def run(a):
        x, idx = a[ix], a[ii].long()
        idx = torch.where(idx < 0, idx + x.shape[ax], idx)
        return torch.gather(x, ax, idx)
    return run


@_op("gather_nd")
def _gather_nd(v):
    ix, ii = v.arg("x"), v.arg("indices")
    if int(v.val("batch_dims", 0)) != 0:
        raise v.unsupported("has batch_dims != 0")

    def run(a):
        x, idx = a[ix], a[ii].long()
        return x[tuple(idx[..., k] for k in range(idx.shape[-1]))]
    return run


@_op("select")
def _select(v):
    ic, ia, ib = v.arg("cond"), v.arg("a"), v.arg("b")
    return lambda a: torch.where(a[ic].bool(), a[ia], a[ib])


@_op("fill")
def _fill(v):
    shape = [int(s) for s in np.asarray(v.val("shape")).reshape(-1)]
    value = v.val("value", 0.0)
    return lambda a: torch.full(shape, float(value) if np.asarray(value).dtype.kind == "f" else int(value))


@_op("fill_like")
def _fill_like(v):
    ix = v.arg("ref_tensor")
    value = float(v.val("value", 0.0))
    return lambda a: torch.full(a[ix].shape, value)


@_op("range_1d")
def _range_1d(v):
    ie, is_, ip = v.arg("end"), v.arg("start"), v.arg("step")
    return lambda a: torch.arange(a[is_].item(), a[ie].item(), a[ip].item())


@_op("shape")
def _shape(v):
    ix = v.arg("x")
    return lambda a: torch.tensor(list(a[ix].shape), dtype=torch.int32)


@_op("flatten2d")
def _flatten2d(v):
    ix = v.arg("x")
    rank = len(v.in_shape("x"))
    ax = _axis(v.val("axis", 1), rank)
    return lambda a: a[ix].reshape(int(np.prod(a[ix].shape[:ax])), -1)


@_op("reverse")
def _reverse(v):
    ix = v.arg("x")
    rank = len(v.in_shape("x"))
    axes = v.val("axes")
    dims = list(range(rank)) if axes is None else [_axis(x, rank) for x in np.asarray(axes).reshape(-1)]
    return lambda a: torch.flip(a[ix], dims)


@_op("cumsum")
def _cumsum(v):
    ix = v.arg("x")
    ax = _axis(v.val("axis", 0), len(v.in_shape("x")))
    excl, rev = bool(v.val("exclusive", False)), bool(v.val("reverse", False))

    def run(a):
        x = a[ix]
        if rev:
            x = torch.flip(x, [ax])
        y = torch.cumsum(x, dim=ax)
        if excl:
            y = y - x
        return torch.flip(y, [ax]) if rev else y
    return run


@_op("band_part")
def _band_part(v):
    ix = v.arg("x")
    lo, hi = int(v.val("lower", -1)), int(v.val("upper", -1))

    def run(a):
        x = a[ix]
        m, n = x.shape[-2], x.shape[-1]
        i = torch.arange(m).reshape(-1, 1)
        j = torch.arange(n).reshape(1, -1)
        keep = torch.ones(m, n, dtype=torch.bool)
        if lo >= 0:
            keep &= (i - j) <= lo
        if hi >= 0:
            keep &= (j - i) <= hi
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype))
    return run


@_op("pixel_shuffle")
def _pixel_shuffle(v):
    ix = v.arg("x")
    r = int(v.val("upscale_factor"))
    return lambda a: F.pixel_shuffle(a[ix], r)


@_op("pixel_unshuffle")
def _pixel_unshuffle(v):
    ix = v.arg("x")
    r = int(v.val("downscale_factor"))
    return lambda a: F.pixel_unshuffle(a[ix], r)


@_op("depth_to_space")
def _depth_to_space(v):
    ix = v.arg("x")
    bs = int(v.val("block_size"))

    def run(a):   # DCR order (TensorFlow's)
        x = a[ix]
        n, c, h, w = x.shape
        y = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (bs * bs), h * bs, w * bs)
    return run


@_op("space_to_depth")
def _space_to_depth(v):
    ix = v.arg("x")
    bs = int(v.val("block_size"))

    def run(a):
        x = a[ix]
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * bs * bs, h // bs, w // bs)
    return run


# --- resizing and sampling --------------------------------------------------------------------------

def _src_coords(n_in: int, n_out: int, mode: str, scale: float | None = None) -> np.ndarray:
    """Source coordinate of every output index along one axis, for MIL's bilinear modes."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "align_corners"):
        if n_out == 1:
            c = np.zeros(1)
        else:
            c = i * (n_in - 1) / (n_out - 1)
    elif mode == "DEFAULT":
        c = i * ((n_in - n_in / n_out) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        c = 0.5 * delta + i * delta
    elif mode in ("UNALIGN_CORNERS", "half_pixel"):
        sp = (1.0 / scale) if scale else n_in / n_out
        c = (i + 0.5) * sp - 0.5
    elif mode == "asymmetric":
        sp = (1.0 / scale) if scale else n_in / n_out
        c = i * sp
    else:
        raise ValueError(mode)
    return np.clip(c, 0, n_in - 1)


def _linear_along(x: torch.Tensor, dim: int, coords: np.ndarray) -> torch.Tensor:
    i0 = np.floor(coords).astype(np.int64)
    i1 = np.minimum(i0 + 1, x.shape[dim] - 1)
    w = torch.from_numpy((coords - i0).astype(np.float32))
    shape = [1] * x.dim()
    shape[dim] = -1
    w = w.reshape(shape)
    a = x.index_select(dim, torch.from_numpy(i0))
    b = x.index_select(dim, torch.from_numpy(i1))
    return a + (b - a) * w


def _bilinear_impl(v, modes):
    ix = v.arg("x")
    xs, os_ = v.in_shape("x"), v.out_shape()
    ch = _src_coords(xs[-2], os_[-2], modes[0][0], modes[0][1])
    cw = _src_coords(xs[-1], os_[-1], modes[1][0], modes[1][1])
    return lambda a: _linear_along(_linear_along(a[ix], a[ix].dim() - 2, ch), a[ix].dim() - 1, cw)


@_op("upsample_bilinear")
def _upsample_bilinear(v):
    sh, sw = float(v.val("scale_factor_height", 1)), float(v.val("scale_factor_width", 1))
    ac = bool(v.val("align_corners", True))
    hpc = v.val("half_pixel_centers")
    hpc = (not ac) if hpc is None else bool(hpc)
    if ac:
        m = "align_corners"
    else:
        m = "half_pixel" if hpc else "asymmetric"
    return _bilinear_impl(v, [(m, sh), (m, sw)])


@_op("resize_bilinear")
def _resize_bilinear(v):
    m = str(v.val("sampling_mode", "DEFAULT"))
    return _bilinear_impl(v, [(m, None), (m, None)])


def _nearest_index(n_in: int, n_out: int, scale: float | None) -> torch.Tensor:
    sp = (1.0 / scale) if scale else n_in / n_out
    return torch.from_numpy(np.minimum(np.floor(np.arange(n_out) * sp + 1e-6).astype(np.int64), n_in - 1))


@_op("upsample_nearest_neighbor")
def _upsample_nn(v):
    ix = v.arg("x")
    xs, os_ = v.in_shape("x"), v.out_shape()
    sh, sw = float(v.val("scale_factor_height", 1)), float(v.val("scale_factor_width", 1))
    ih, iw = _nearest_index(xs[-2], os_[-2], sh), _nearest_index(xs[-1], os_[-1], sw)

    def run(a):
        x = a[ix]
        return x.index_select(x.dim() - 2, ih).index_select(x.dim() - 1, iw)
    return run


@_op("resize_nearest_neighbor")
def _resize_nn(v):
    ix = v.arg("x")
    xs, os_ = v.in_shape("x"), v.out_shape()
    ih, iw = _nearest_index(xs[-2], os_[-2], None), _nearest_index(xs[-1], os_[-1], None)

    def run(a):
        x = a[ix]
        return x.index_select(x.dim() - 2, ih).index_select(x.dim() - 1, iw)
    return run


@_op("resample")
def _resample(v):
    ix, ic = v.arg("x"), v.arg("coordinates")
    xs = v.in_shape("x")
    mode = str(v.val("sampling_mode", "bilinear"))
    pmode = str(v.val("padding_mode", "constant"))
    pval = float(v.val("padding_value", 0.0))
    cmode = str(v.val("coordinates_mode", "normalized_minus_one_to_one"))
    ac = bool(v.val("align_corners", False))
    if mode not in ("bilinear", "nearest"):
        raise v.unsupported(f"has unknown sampling_mode '{mode}'")
    H, W = xs[2], xs[3]
    sizes = torch.tensor([W, H], dtype=torch.float32)
    # torch's grid_sample couples reflection to align_corners; MIL's reflection (about the edge pixels'
    # centres) is torch's reflection with align_corners=True, MIL's symmetric (about the edges) is
    # torch's with align_corners=False: otherwise the coordinates are converted to that convention
    if pmode == "constant":
        tpad, tac = "zeros", ac
    elif pmode == "border":
        tpad, tac = "border", ac
    elif pmode == "reflection":
        tpad, tac = "reflection", True
    elif pmode == "symmetric":
        tpad, tac = "reflection", False
    else:
        raise v.unsupported(f"has unknown padding_mode '{pmode}'")

    def to_pixels(c):   # MIL coordinates → pixel coordinates (0 = centre of the first pixel)
        if cmode == "unnormalized":
            return c
        if cmode == "normalized_zero_to_one":
            c = c * 2 - 1
        elif cmode != "normalized_minus_one_to_one":
            raise v.unsupported(f"has unknown coordinates_mode '{cmode}'")
        return ((c + 1) / 2) * (sizes - 1) if ac else ((c + 1) * sizes - 1) / 2

    def to_grid(p):     # pixel coordinates → torch's normalised grid under align_corners=tac
        return p / (sizes - 1) * 2 - 1 if tac else (2 * p + 1) / sizes - 1

    direct = cmode == "normalized_minus_one_to_one" and tac == ac

    def run(a):
        x, c = a[ix], a[ic]
        c = c.to(torch.float32) if c.dtype != torch.float32 else c
        g = c if direct else to_grid(to_pixels(c))
        if x.dtype != g.dtype:
            g = g.to(x.dtype)
        if tpad == "zeros" and pval != 0.0:
            return F.grid_sample(x - pval, g, mode=mode, padding_mode="zeros", align_corners=tac) + pval
        return F.grid_sample(x, g, mode=mode, padding_mode=tpad, align_corners=tac)
    return run


# --- attention (iOS18) --------------------------------------------------------------------------------

@_op("scaled_dot_product_attention")
def _sdpa(v):
    iq, ik, iv = v.arg("query"), v.arg("key"), v.arg("value")
    im = v.arg("attn_mask") if v.has("attn_mask") else None

    def run(a):
        mask = None if im is None else a[im]
        return F.scaled_dot_product_attention(a[iq], a[ik], a[iv], attn_mask=mask)
    return run


# --- top-k and friends ----------------------------------------------------------------------------

@_op("topk")
def _topk(v):
    ix = v.arg("x")
    rank = len(v.in_shape("x"))
    k = int(v.val("k", 1))
    ax = _axis(v.val("axis", -1), rank)
    asc = bool(v.val("ascending", False))

    def run(a):
        vals, idx = torch.topk(a[ix], k, dim=ax, largest=not asc, sorted=True)
        return vals, idx.to(torch.int32)
    return run


@_op("argsort")
def _argsort(v):
    ix = v.arg("x")
    ax = _axis(v.val("axis", -1), len(v.in_shape("x")))
    asc = bool(v.val("ascending", False))
    return lambda a: torch.argsort(a[ix], dim=ax, descending=not asc, stable=True).to(torch.int32)


@_op("one_hot")
def _one_hot(v):
    ii = v.arg("indices")
    depth = int(v.val("one_hot_vector_size"))
    ax = int(v.val("axis", -1))
    on, off = float(v.val("on_value", 1.0)), float(v.val("off_value", 0.0))

    def run(a):
        oh = F.one_hot(a[ii].long(), depth).to(torch.float32)
        y = oh * (on - off) + off
        return y.movedim(-1, ax) if ax != -1 else y
    return run
