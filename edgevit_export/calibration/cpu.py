"""What this CPU offers int8 kernels, and the weight range that follows from it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CpuInt8:
    model: str
    arch: str
    vnni: bool                  # avx512_vnni or avx_vnni (x86), or an ARM CPU with dot products
    flags: list[str]            # the int8-relevant flags found

    def describe(self) -> str:
        return f"{self.model or self.arch} ({', '.join(self.flags) or 'no int8 dot-product flags'})"


def cpu_int8() -> CpuInt8:
    """What this CPU offers int8 kernels, from /proc/cpuinfo (Linux) or platform facts."""
    import platform

    arch = platform.machine().lower()
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and not model:
                model = val.strip()
            elif key in ("flags", "features"):
                flags.update(val.split())
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    found = [f for f in wanted if f in flags]
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags) or (arch in ("arm64", "aarch64")
                                                                      and ("asimddp" in flags or not flags))
    return CpuInt8(model or platform.processor() or arch, arch, vnni, found)


def default_reduce_range() -> tuple[bool, str]:
    """7-bit weights unless told otherwise: an int8 ONNX runs on whatever CPU its user has, not
    the one that quantized it, and x86 without VNNI saturates the int16 sums of full-range u8s8
    weights (onnxruntime's advice). The build machine's CPU is named, never used to decide."""
    c = cpu_int8()
    return True, ("7-bit weights (reduce_range), the default that is exact on every CPU (x86 without VNNI "
                  "saturates full-range u8s8 sums); pass --no-reduce-range for a target with VNNI or an ARM "
                  f"CPU (this machine: {'has' if c.vnni else 'has no'} int8 dot products, {c.describe()})")
