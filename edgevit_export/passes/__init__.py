"""Graph rewrites between capture and backends (see pipeline.py)."""

from .base import GraphStats, Pass, PassContext, PassRefused, graph_stats
from .pipeline import DEFAULT_PIPELINES, PASSES, PassResult, PipelineResult, resolve_passes, run_passes

__all__ = ["Pass", "PassContext", "PassRefused", "GraphStats", "graph_stats", "PASSES", "DEFAULT_PIPELINES",
           "PassResult", "PipelineResult", "resolve_passes", "run_passes"]
