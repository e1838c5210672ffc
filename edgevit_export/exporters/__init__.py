"""Backends: each knows only its format (onnx.py, coreml.py); manifest.py and check.py are shared."""
