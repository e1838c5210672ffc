"""The machine's achievable fp32 matrix-multiply rate in onnxruntime: the yardstick that turns a
model's GFLOP/s into a share of what this CPU can do."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..ort import session


@dataclass
class MatmulPeak:
    threads: int
    sizes: list[int]
    gflops: list[float]            # median-run GFLOP/s per size (n×n @ n×n)
    median_ms: list[float]
    p10_gflops: list[float] = field(default_factory=list)  # at the fastest decile's time (less hurt by a busy machine)

    @property
    def peak_gflops(self) -> float:
        return max(self.gflops)

    @property
    def best_size(self) -> int:
        return self.sizes[self.gflops.index(self.peak_gflops)]


def matmul_model(n: int) -> bytes:
    """A one-node ONNX model: Y = X @ W with X an n×n input and W an n×n constant."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "matmul_peak",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])],
        initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def measure_matmul_peak(threads: int = 2, sizes: tuple[int, ...] = (256, 512, 1024, 2048), *,
                        seconds_per_size: float = 2.0, min_runs: int = 5) -> MatmulPeak:
    """Achievable fp32 GFLOP/s of onnxruntime's MatMul on this machine with ``threads`` threads:
    the median run at each size, and the best size's figure as the peak."""
    gfl, med, fast = [], [], []
    for n in sizes:
        sess = session(matmul_model(n), threads=threads)
        x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        for _ in range(3):
            sess.run(None, {"X": x})
        ts = []
        t_end = time.perf_counter() + seconds_per_size
        while len(ts) < min_runs or time.perf_counter() < t_end:
            t0 = time.perf_counter_ns()
            sess.run(None, {"X": x})
            ts.append((time.perf_counter_ns() - t0) / 1e6)
            if len(ts) >= 2000:
                break
        m = float(np.median(ts))
        med.append(m)
        gfl.append(2 * n ** 3 / (m / 1e3) / 1e9)
        fast.append(2 * n ** 3 / (float(np.percentile(ts, 10)) / 1e3) / 1e9)
    return MatmulPeak(threads, list(sizes), gfl, med, fast)
