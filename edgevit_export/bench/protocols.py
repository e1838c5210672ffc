"""Latency protocols as data: what the papers measured, and what we do on a Linux box instead.

Each protocol is a frozen record; the runner reads nothing else. Sources: REFERENCE.md, "How
latency was measured" (SHViT iPhone 12 / Core ML; MobileOne-FastViT ModelBench; SHViT CPU-ONNX).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import EdgeExportError

MEDIAN = "median"
MEAN_OF_TRIMMED_ROUND_MEANS = "mean of trimmed round means"


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str
    batch: int
    threads: int
    runs: int                 # timed runs per round
    rounds: int = 1
    fresh_session_per_round: bool = False
    discard_first: int = 0    # untimed runs at the start of each round (a warm-up inside the round)
    trim_fraction: float = 0.0  # share of the fastest and of the slowest runs dropped per round
    warmup_runs: int = 10     # warm-up before timing (rounds protocols: discard_first does this)
    warmup_seconds: float = 2.0  # ... but stop warming up after this long (at least 2 runs)
    statistic: str = MEDIAN   # the headline figure
    headline: str = "ms"      # "ms" or "img/s"
    precision: str = "fp32"
    original: str = ""        # what the paper measured
    differs: tuple[str, ...] = field(default_factory=tuple)  # what is not the same here

    def trim(self, runs: int) -> int:
        """Runs dropped at each end of a round of ``runs`` runs."""
        if self.trim_fraction <= 0:
            return 0
        t = int(round(runs * self.trim_fraction))
        return t if runs - 2 * t >= 1 else max(0, (runs - 1) // 2)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["differs"] = list(self.differs)
        return d


_COMMON_DIFFS = (
    "a CPU runtime (onnxruntime, ExecuTorch or PyTorch) on this machine's CPU, not Core ML on the A14 (CPU/GPU/Neural Engine)",
    "fp32 on the CPU; the Neural Engine computes in fp16",
)

PROTOCOLS: dict[str, Protocol] = {
    "iphone12": Protocol(
        name="iphone12",
        summary="batch 1, fp32, 2 intra-op threads, sequential, all graph optimisations, "
                "warm-up, then the median of 1,000 runs with p10/p90",
        batch=1, threads=2, runs=1000, warmup_runs=10, warmup_seconds=2.0,
        original="SHViT on iPhone 12: iOS 16.5, Core ML, batch 1, median of 1,000 runs (Xcode); "
                 "2 threads stand for the A14's 2 performance cores",
        differs=_COMMON_DIFFS,
    ),
    "modelbench": Protocol(
        name="modelbench",
        summary="20 rounds × 50 runs, a fresh session each round, the first run of each round "
                "discarded, 10 fastest + 10 slowest trimmed, the mean of round means",
        batch=1, threads=2, runs=50, rounds=20, fresh_session_per_round=True, discard_first=1,
        trim_fraction=0.2, warmup_runs=0, warmup_seconds=0.0, statistic=MEAN_OF_TRIMMED_ROUND_MEANS,
        original="MobileOne/FastViT ModelBench on iPhone 12 Pro: batch 1, 20 rounds × 50 inferences, "
                 "model reloaded each round, one warm-up discarded, 10 fastest and 10 slowest trimmed",
        differs=_COMMON_DIFFS,
    ),
    "shvit-cpu": Protocol(
        name="shvit-cpu",
        summary="batch 16, 1 thread, fp32, warm-up, then the median of 50 runs, reported as images per second",
        batch=16, threads=1, runs=50, warmup_runs=3, warmup_seconds=5.0, headline="img/s",
        original="SHViT paper, CPU: onnxruntime, batch 16, one thread, images per second "
                 "(run count not stated; its CPU differs from this one)",
        differs=("this machine's CPU, not the paper's",),
    ),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise EdgeExportError(f"unknown protocol '{name}'; use one of: {', '.join(PROTOCOLS)}") from None
