"""What ``bench`` returns: one :class:`Timing` per model × resolution, and the :class:`BenchResult`
that holds them with the protocol and the machine they were measured on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .env import Environment
from .protocols import Protocol
from .timing import Measurement

SPREAD = "p90 − p10"  # what "spread" means everywhere in bench output


@dataclass
class Timing:
    """One model at one resolution under one protocol."""

    model: str
    res: tuple[int, int]
    batch: int
    runtime: str
    threads: int
    source: str                    # "export" (model name, via the cache) | "file" | "pytorch"
    path: str | None
    headline_ms: float             # the protocol's statistic (median, or mean of trimmed round means)
    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    runs: int
    runs_total: int
    rounds: int
    warmup_runs: int
    seconds: float
    macs: int | None               # for the whole batch
    macs_source: str               # "manifest" | "onnx graph" | "pytorch" | ""
    stopped_early: bool = False
    cached: bool = False
    round_means_ms: list[float] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def spread_ms(self) -> float:
        return self.p90_ms - self.p10_ms

    @property
    def macs_per_image(self) -> float | None:
        return None if self.macs is None else self.macs / self.batch

    @property
    def gflops(self) -> float | None:
        """Achieved GFLOP/s: 2 × MACs / time (2 FLOPs per multiply-accumulate)."""
        return None if not self.macs else 2 * self.macs / (self.headline_ms / 1e3) / 1e9

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.headline_ms / 1e3)

    def as_dict(self, samples: bool = True) -> dict:
        d = asdict(self)
        d["res"] = list(self.res)
        d.update(spread_ms=self.spread_ms, spread=SPREAD, gflops=self.gflops, images_per_s=self.images_per_s,
                 macs_per_image=self.macs_per_image)
        if not samples:
            d.pop("samples_ms")
            d.pop("round_means_ms")
        return d


def timing_of(m: Measurement, **kw) -> Timing:
    """A :class:`Timing` of ``m``'s figures (``kw``: what was timed, and how)."""
    s = m.samples_ms
    return Timing(headline_ms=m.headline_ms, median_ms=m.median_ms, mean_ms=float(np.mean(s)),
                  p10_ms=m.percentile(10), p90_ms=m.percentile(90), q1_ms=m.percentile(25), q3_ms=m.percentile(75),
                  min_ms=float(np.min(s)), max_ms=float(np.max(s)), runs=m.runs, runs_total=m.runs_total,
                  rounds=m.rounds, warmup_runs=m.warmup_runs, seconds=m.seconds, stopped_early=m.stopped_early,
                  round_means_ms=[round(v, 5) for v in m.round_means_ms],
                  samples_ms=[round(v, 5) for v in s], **kw)


@dataclass
class BenchResult:
    protocol: Protocol
    runtime: str
    threads: int
    runs: int
    passes: str
    env: Environment
    timings: list[Timing]
    cache_dir: str | None
    seconds: float
    spread: str = SPREAD
    max_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self, samples: bool = True) -> dict:
        return {"protocol": self.protocol.as_dict(), "runtime": self.runtime, "threads": self.threads,
                "runs": self.runs, "passes": self.passes, "spread": self.spread, "max_seconds": self.max_seconds,
                "cache_dir": self.cache_dir, "seconds": round(self.seconds, 3), "environment": self.env.as_dict(),
                "notes": self.notes, "results": [t.as_dict(samples) for t in self.timings]}
