"""The runner's ground: its error, coremltools imported quietly, and MIL dtypes ↔ torch/numpy."""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch

from ...quiet import silenced
from ...errors import CannotRun


class UnsupportedOp(CannotRun):
    """An op of the program that this runner cannot execute (one line: op type and op name)."""

    def __init__(self, op_type: str, op_name: str, why: str = "is not implemented"):
        self.op_type, self.op_name = op_type, op_name
        super().__init__(f"Core ML runner: op '{op_type}' (at op '{op_name}') {why}; the reference runner "
                         f"cannot execute this program (run it on macOS with coremltools, or add the op to "
                         f"edgevit_export/exporters/coreml_runner/)")


def _ct():
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with silenced():
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto import load as _milload  # noqa: F401
    return ct


# --- dtypes -------------------------------------------------------------------------------------

_TORCH_DTYPE = {
    "fp16": torch.float32, "fp32": torch.float32, "fp64": torch.float64,
    "int32": torch.int32, "int64": torch.int64, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "uint16": torch.int32, "uint32": torch.int64, "uint64": torch.int64,
    "int4": torch.int8, "uint4": torch.uint8, "uint2": torch.uint8, "uint1": torch.uint8,
    "uint3": torch.uint8, "uint6": torch.uint8, "bool": torch.bool,
}
_NUMPY_OUT = {"fp16": np.float32, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "int64": np.int64,
              "bool": np.bool_}


def _dtype_name(var) -> str:
    from coremltools.converters.mil.mil import types
    try:
        t = var.dtype
    except ValueError:
        return "list"
    try:
        return types.builtin_to_string(t)
    except Exception:
        return str(t)


def _coercer(name: str) -> Callable | None:
    """The function that rounds an op's result to its declared dtype (None: leave as is)."""
    if name == "fp16":
        def r16(t):
            if not t.is_floating_point():
                t = t.to(torch.float32)
            return t.to(torch.float16).to(torch.float32)
        return r16
    td = _TORCH_DTYPE.get(name)
    if td is None:
        return None

    def rc(t):
        return t if t.dtype == td else t.to(td)
    return rc


def _to_tensor(val, dtype_name: str) -> torch.Tensor:
    a = np.asarray(val)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    td = _TORCH_DTYPE.get(dtype_name)
    if a.dtype.kind in "US":
        raise TypeError("string constant")
    if a.dtype == np.uint16:
        a = a.astype(np.int32)
    elif a.dtype in (np.uint32, np.uint64):
        a = a.astype(np.int64)
    t = torch.from_numpy(np.ascontiguousarray(a).copy())
    if td is not None and t.dtype != td:
        t = t.to(td)
    return t
