"""Calibration, quantization and what it cost in accuracy.

- :mod:`.quantize` — ``quantize()``: static int8 QDQ ONNX (onnxruntime.quantization) or Core ML
  weight compression (coremltools.optimize), with float-vs-quantized metrics, per-layer
  sensitivity and keep-float; ``evaluate()``: top-1/top-5 of a model or an ONNX artifact.
- :mod:`.data` — image folders, the model's preprocessing, synthetic images.
- :mod:`.accuracy` — predictors, top-k, agreement/cosine/SQNR, per-layer sensitivity.
- :mod:`.shapes`, :mod:`.train` — a drawn 10-class image set and a small model trained on it:
  honest data for tests and demos (there are no ImageNet weights here).
"""
