"""Timing under a protocol: warm-up, rounds (a fresh session each round where the protocol says
so), discarded first runs, trimmed extremes, a time budget. Times one zero-argument call; the
onnxruntime and eager PyTorch runners build that call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EdgeExportError
from ..ort import user_session
from ..progress import Callback, emit
from .onnx_facts import OnnxInput, onnx_input
from .protocols import MEDIAN, Protocol, get_protocol


@dataclass
class Measurement:
    """Timed runs under a protocol. All figures in milliseconds per run (one run = one batch)."""

    samples_ms: list[float]          # the runs kept (after per-round discards and trims), in run order
    round_means_ms: list[float]      # one per round (one round unless the protocol has rounds)
    runs: int                        # kept runs
    runs_total: int                  # runs executed, warm-up and discarded ones included
    warmup_runs: int
    rounds: int
    seconds: float
    statistic: str
    stopped_early: bool = False

    @property
    def headline_ms(self) -> float:
        if self.statistic == MEDIAN:
            return self.median_ms
        return float(np.mean(self.round_means_ms))

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))


class _Budget:
    def __init__(self, max_seconds: float | None):
        self.deadline = None if not max_seconds else time.perf_counter() + max_seconds

    def over(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


class _Ticker:
    """Counted progress at most every 0.1 s (a bar redrawn per run would cost time of its own)."""

    def __init__(self, progress: Callback | None, task: str, total: int):
        self.progress, self.task, self.total = progress, task, total
        self.done, self.last = 0, 0.0

    def tick(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last > 0.1:
            self.last = now
            emit(self.progress, self.task, self.done, self.total)

    def end(self) -> None:
        """The bar ends full, at what ran (a budget or the warm-up time may stop it early)."""
        emit(self.progress, self.task, self.done, self.done)


def _trimmed(samples: list[float], trim: int) -> list[float]:
    """Without the ``trim`` fastest and slowest runs, in run order."""
    if not trim or len(samples) <= 2 * trim:
        return samples
    order = sorted(range(len(samples)), key=samples.__getitem__)
    drop = set(order[:trim]) | set(order[len(samples) - trim:])
    return [v for i, v in enumerate(samples) if i not in drop]


def time_callable(make_run: Callable[[], Callable[[], object]], protocol: Protocol, *, runs: int | None = None,
                  max_seconds: float | None = None, min_runs: int = 10,
                  progress: Callback | None = None) -> Measurement:
    """Time ``make_run()()`` under ``protocol``. ``make_run`` builds whatever must be fresh per
    round (an onnxruntime session) and returns the zero-argument function timed for one run.

    ``max_seconds`` caps the timed phase: timing stops once at least ``min_runs`` runs (one round
    for round protocols) are in and the budget is spent; the result says so (``stopped_early``).
    ``progress`` hears "load session" (a stage), then the counted tasks "warm-up" and "timing".
    """
    runs = protocol.runs if runs is None else runs
    if runs < 1:
        raise EdgeExportError(f"--runs must be at least 1, got {runs}")
    rounds = protocol.rounds
    t_start = time.perf_counter()
    emit(progress, "load session")
    run = make_run()
    warm = 0
    if protocol.warmup_runs and not protocol.fresh_session_per_round:
        warmup = _Ticker(progress, "warm-up", protocol.warmup_runs)
        t_w = time.perf_counter()
        while warm < protocol.warmup_runs:
            run()
            warm += 1
            warmup.tick()
            if warm >= min(2, protocol.warmup_runs) and time.perf_counter() - t_w > protocol.warmup_seconds:
                break
        warmup.end()

    budget = _Budget(max_seconds)
    timing = _Ticker(progress, "timing", rounds * (protocol.discard_first + runs))
    kept: list[float] = []
    round_means: list[float] = []
    stopped = False
    perf = time.perf_counter_ns
    for r in range(rounds):
        if protocol.fresh_session_per_round and r > 0:
            run = make_run()
        for _ in range(protocol.discard_first):
            run()
            timing.tick()
        samples = []
        for i in range(runs):
            t0 = perf()
            run()
            samples.append((perf() - t0) / 1e6)
            timing.tick()
            if rounds == 1 and len(samples) >= min_runs and budget.over():
                stopped = i + 1 < runs
                break
        cut = _trimmed(samples, protocol.trim(runs))
        kept += cut
        round_means.append(float(np.mean(cut)))
        if rounds > 1 and budget.over() and r + 1 < rounds:
            stopped = True
            break
    timing.end()
    return Measurement(samples_ms=kept, round_means_ms=round_means, runs=len(kept), runs_total=warm + timing.done,
                       warmup_runs=warm + protocol.discard_first * len(round_means), rounds=len(round_means),
                       seconds=time.perf_counter() - t_start, statistic=protocol.statistic, stopped_early=stopped)


def make_input(inp: OnnxInput, batch: int, hw: tuple[int, int] | None, raw_pixels: bool = False) -> np.ndarray:
    """A seeded input of the file's shape; symbolic batch/H/W take ``batch`` and ``hw``."""
    n, c, h, w = inp.shape
    if (h is None or w is None) and hw is None:
        raise EdgeExportError(f"input '{inp.name}' has a symbolic height/width; pass --res")
    shape = (n or batch, c or 3, h or hw[0], w or hw[1])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, shape) if raw_pixels else rng.standard_normal(shape)
    return x.astype(inp.dtype)


def ort_runner(path: Path, threads: int, feed: dict[str, np.ndarray]) -> Callable[[], Callable[[], object]]:
    """A ``make_run`` for :func:`time_callable`: a fresh session (all graph optimisations,
    ``threads`` intra-op threads) each call, returning its ``run`` bound to ``feed``."""

    def make():
        sess = user_session(Path(path), threads=threads, optimize=True)
        return lambda: sess.run(None, feed)

    return make


def time_onnx(path: Path, protocol: Protocol | str, *, threads: int | None = None, runs: int | None = None,
              hw: tuple[int, int] | None = None, batch: int | None = None, max_seconds: float | None = None,
              progress: Callback | None = None) -> Measurement:
    """Time one ONNX file under ``protocol`` (thread count and run count overridable)."""
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    inp = onnx_input(Path(path))
    x = make_input(inp, batch or protocol.batch, hw)
    make = ort_runner(Path(path), threads or protocol.threads, {inp.name: x})
    return time_callable(make, protocol, runs=runs, max_seconds=max_seconds, progress=progress)


def time_torch(model, x, protocol: Protocol, *, threads: int, runs: int | None = None,
               max_seconds: float | None = None, progress: Callback | None = None) -> Measurement:
    """Time the eager PyTorch model (inference mode, ``threads`` intra-op threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def make():
            def run():
                with torch.inference_mode():
                    return model(x)
            return run

        return time_callable(make, protocol, runs=runs, max_seconds=max_seconds, progress=progress)
    finally:
        torch.set_num_threads(before)
