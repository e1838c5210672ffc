"""Latency measurement: protocols (iphone12, modelbench, shvit-cpu), the timing runner, the
onnxruntime profiler aggregation, and reports (tables, JSON, CSV, PNG plots).

    from edgevit_export.bench import run_bench
    result = run_bench("shvit_s1,litv2_s", "224,512", protocol="iphone12", runs=200)
    for t in result.timings:
        print(t.model, t.res, t.median_ms, t.spread_ms, t.gflops)

Modules: :mod:`.runner` (``run_bench``), :mod:`.plan` (what to time), :mod:`.cache` (the export
cache), :mod:`.timing` (protocol timing), :mod:`.results`, :mod:`.onnx_facts` (input, MACs,
manifest of a file), :mod:`.matmul_peak`, :mod:`.profile`, :mod:`.report`, :mod:`.env`.
"""

from .matmul_peak import MatmulPeak, measure_matmul_peak
from .protocols import PROTOCOLS, Protocol, get_protocol
from .results import BenchResult, Timing
from .runner import run_bench
from .timing import Measurement, time_callable, time_onnx, time_torch


def run_profile(*args, **kwargs):
    """See :func:`edgevit_export.bench.profile.run_profile`."""
    from .profile import run_profile as _run

    return _run(*args, **kwargs)


__all__ = ["PROTOCOLS", "Protocol", "get_protocol", "BenchResult", "Measurement", "Timing", "run_bench",
           "run_profile", "time_onnx", "time_torch", "time_callable", "measure_matmul_peak", "MatmulPeak"]
