"""The one way this package opens an onnxruntime session: CPU, sequential, quiet.

``threads`` intra-op threads and one inter-op thread; all graph optimisations or none. Sessions
that run interleaved with another one (float and int8 side by side) pass ``spinning=False``: idle
spinning thread pools slow each other down on a small machine (DESIGN, "Tests and benchmarks").
"""

from __future__ import annotations

from pathlib import Path

from .errors import EdgeExportError, first_line


def session(path_or_bytes, *, threads: int = 2, optimize: bool = True, spinning: bool = True,
            profile_prefix: str | None = None):
    """An ``onnxruntime.InferenceSession`` of a file (str or Path) or a serialised model (bytes).

    ``optimize``: ORT_ENABLE_ALL, else ORT_DISABLE_ALL (run the graph exactly as written).
    ``profile_prefix``: turn on onnxruntime's profiler, writing its JSON under that prefix.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])


def user_session(path: Path, **options):
    """:func:`session` of a file the user named: one onnxruntime cannot load is a one-line
    :class:`EdgeExportError` that quotes onnxruntime's reason."""
    try:
        return session(Path(path), **options)
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeError types
        raise EdgeExportError(f"onnxruntime cannot load {path}: {first_line(e)[:300]}") from None
