"""The environment a timing was taken in: CPU, cores, library versions, thread settings, load."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import os
import platform
from dataclasses import asdict, dataclass, field

_INTERESTING_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
                      "amx_bf16", "amx_int8", "asimd", "sve")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class Environment:
    cpu: str
    logical_cpus: int
    cpus_available: int       # what this process may run on (affinity / cgroup-visible cores)
    cpu_flags: list[str]
    machine: str
    system: str
    python: str
    onnxruntime: str | None
    torch: str | None
    onnx: str | None
    numpy: str | None
    edgevit_export: str
    intra_op_threads: int
    inter_op_threads: int
    execution_mode: str
    graph_optimization: str
    load_average: list[float] | None   # 1/5/15 min load when the bench started: a busy machine shows here
    thread_env: dict[str, str] = field(default_factory=dict)
    date: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def busy(self) -> bool:
        """More runnable work than CPUs when timing started: figures are slower than the machine."""
        return bool(self.load_average) and self.load_average[0] > self.cpus_available

    def machine_line(self) -> str:
        """CPU, its vector extensions that matter for int8 and fp32 kernels, CPUs available."""
        wide = [f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2", "asimd", "sve") if f in self.cpu_flags]
        ext = f" ({wide[0].upper().replace('_', ' ')})" if wide else ""
        return f"{self.cpu}{ext}, {self.cpus_available} CPUs"

    def one_line(self) -> str:
        load = f", load {self.load_average[0]:.1f}" if self.load_average else ""
        return (f"{self.cpu} ({self.cpus_available}/{self.logical_cpus} CPUs available{load}) · "
                f"onnxruntime {self.onnxruntime} · torch {self.torch} · "
                f"{self.intra_op_threads} intra-op thread(s), {self.execution_mode}, "
                f"graph optimisation {self.graph_optimization}")


def _cpuinfo() -> tuple[str, list[str]]:
    """CPU model and flags from /proc/cpuinfo (Linux); platform's answer elsewhere."""
    model, flags = "", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if not model and key in ("model name", "hardware", "cpu model", "processor") and value \
                        and not value.isdigit():
                    model = value
                elif not flags and key in ("flags", "features"):
                    have = set(value.split())
                    flags = [fl for fl in _INTERESTING_FLAGS if fl in have]
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", flags


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def collect(intra_op_threads: int, *, inter_op_threads: int = 1, execution_mode: str = "sequential",
            graph_optimization: str = "all") -> Environment:
    from .. import __version__

    cpu, flags = _cpuinfo()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return Environment(
        cpu=cpu, logical_cpus=os.cpu_count() or 1, cpus_available=_available_cpus(), cpu_flags=flags,
        machine=platform.machine(), system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(), onnxruntime=_version("onnxruntime"), torch=_version("torch"),
        onnx=_version("onnx"), numpy=_version("numpy"), edgevit_export=__version__,
        intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads, execution_mode=execution_mode,
        graph_optimization=graph_optimization, load_average=load,
        thread_env={k: os.environ[k] for k in _THREAD_VARS if k in os.environ},
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
