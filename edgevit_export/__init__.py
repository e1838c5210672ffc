"""edgevit-export: efficient vision transformers for phones → ONNX and Core ML."""

__version__ = "0.1.0"

from .errors import CheckFailed, EdgeExportError  # noqa: E402
from .registry import create_model, get_model_info, list_models  # noqa: E402

__all__ = ["create_model", "list_models", "get_model_info", "EdgeExportError", "CheckFailed", "__version__"]
