"""edgevit-export: efficient vision transformers for phones → ONNX and Core ML.

The public Python API (every call returns data; the CLI only renders it):

    create_model, list_models, get_model_info     the model zoo
    export, inspect, info                          capture → passes → backend → check
    run_bench, profile                             latency under the iPhone-12-like protocols
    quantize, evaluate                             int8 with calibration and an accuracy gate
"""

__version__ = "0.2.0"

from .errors import CheckFailed, EdgeExportError  # noqa: E402
from .registry import create_model, get_model_info, list_models  # noqa: E402

_LAZY = {
    "export": ("api", "export"),
    "inspect": ("api", "inspect"),
    "info": ("api", "info"),
    "run_bench": ("bench.runner", "run_bench"),  # not "bench": that is the subpackage
    "profile": ("bench.profile", "profile_onnx"),
    "quantize": ("calibration.quantize", "quantize"),
    "evaluate": ("calibration.evaluation", "evaluate"),
    "load": ("api", "load"),
    "check": ("api", "check"),
    "run": ("api", "run"),
}


def __getattr__(name):  # heavy backends (onnxruntime.quantization, coremltools) load on first use
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["create_model", "list_models", "get_model_info", "EdgeExportError", "CheckFailed", "__version__",
           *_LAZY]
