"""Calibration, quantization and what it cost in accuracy.

- :mod:`.quantize` — ``quantize()``: checks the flags (:mod:`.options`), resolves the model or
  file (:mod:`.target`) and its data, and hands the job to its format: static int8 QDQ ONNX
  (:mod:`.ort_int8`, calibrated by :mod:`.calibrate`) or Core ML weight compression
  (:mod:`.coreml_weights`); :mod:`.results` holds what it returns and the manifest it writes.
- :mod:`.evaluation` — the evaluation images, float vs quantized on them, and ``evaluate()``:
  top-1/top-5 of a model or an ONNX artifact.
- :mod:`.accuracy` — predictors, top-k, agreement/cosine/SQNR; :mod:`.sensitivity` — per-layer error.
- :mod:`.data` — image folders, the model's preprocessing, synthetic images; :mod:`.cpu` — int8 on this CPU.
- :mod:`.shapes`, :mod:`.train` — a drawn 10-class image set and a small model trained on it:
  honest data for tests and demos (there are no ImageNet weights here).
"""
