"""Latency measurement: protocols (iphone12, modelbench, shvit-cpu), the timing runner, the
onnxruntime profiler aggregation, and reports (tables, JSON, CSV, PNG plots).

    from edgevit_export.bench import run_bench
    result = run_bench("shvit_s1,litv2_s", "224,512", protocol="iphone12", runs=200)
    for t in result.timings:
        print(t.model, t.res, t.median_ms, t.spread_ms, t.gflops)
"""

from .protocols import PROTOCOLS, Protocol, get_protocol
from .runner import (BenchResult, Measurement, Timing, measure_matmul_peak, run_bench, time_callable, time_onnx,
                     time_torch)


def run_profile(*args, **kwargs):
    """See :func:`edgevit_export.bench.profile.run_profile`."""
    from .profile import run_profile as _run

    return _run(*args, **kwargs)


__all__ = ["PROTOCOLS", "Protocol", "get_protocol", "BenchResult", "Measurement", "Timing", "run_bench",
           "run_profile", "time_onnx", "time_torch", "time_callable", "measure_matmul_peak"]
