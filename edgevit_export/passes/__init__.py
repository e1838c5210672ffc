"""Graph rewrites between capture and backends (see pipeline.py)."""

from .base import GraphStats, Pass, PassContext, PassRefused, graph_stats
from .pipeline import PASSES, PassResult, PipelineResult, resolve_passes, run_passes

__all__ = ["Pass", "PassContext", "PassRefused", "GraphStats", "graph_stats", "PASSES",
           "PassResult", "PipelineResult", "resolve_passes", "run_passes"]
