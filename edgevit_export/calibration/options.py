"""The flags of ``quantize``, checked once, up front: :meth:`QuantizeOptions.validated` raises
:class:`~edgevit_export.errors.EdgeExportError` for a bad value before anything is read or written,
and fills in what the flags leave open (the weight range for this CPU, 8-bit Core ML weights)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeExportError
from .cpu import default_reduce_range

METHODS = ("minmax", "entropy", "percentile", "histogram")
ONNX_METHODS = ("minmax", "entropy", "percentile")
PTE_METHODS = ("minmax", "histogram")        # torchao observers: MinMaxObserver, HistogramObserver
FORMATS = ("onnx", "coreml", "pte", "tflite")
PALETTE_BITS = (4, 6, 8)
WEIGHT_BITS = (8,)
AUTO_MAX_STEPS = 12            # keep-float auto gives up after this many candidates


def at_least_one(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise EdgeExportError(f"{flag} must be at least 1, got {value}")


MAX_THREADS = 1024


def check_threads(value: int | None) -> None:
    """``--threads``: 1 to 1024 (a larger count overflows the runtimes' thread-pool setters)."""
    if value is not None and not 1 <= value <= MAX_THREADS:
        raise EdgeExportError(f"--threads must be 1 to {MAX_THREADS}, got {value}")


def parse_keep_float(spec: str | list[str] | None) -> str | list[str] | None:
    """``--keep-float``: None, ``"auto"``, or the node names (comma-separated or a list)."""
    if spec is None or spec == "" or spec == []:
        return None
    if isinstance(spec, str):
        if spec.strip().lower() == "auto":
            return "auto"
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    if not names:
        raise EdgeExportError("--keep-float needs 'auto' or node names separated by commas")
    return names


def known_nodes(keep, names: list[str]) -> list[str]:
    """The nodes ``--keep-float NODE,…`` names, each checked against the graph's ``names``
    (none for None or "auto")."""
    if not isinstance(keep, list):
        return []
    unknown = [k for k in keep if k not in set(names)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=2, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise EdgeExportError(f"--keep-float: no node named {unknown[0]!r}{hint}; names are those of the "
                              "sensitivity table (run once without --keep-float to see them)")
    return list(keep)


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything ``quantize`` is told besides the model. ``keep_float`` is parsed (None, "auto"
    or node names); after :meth:`validated`, ``reduce_range`` and ``weights_bits`` are decided and
    ``reduce_range_note`` says why the range was chosen when the flag was left out (Core ML
    compresses weights only: no weight range, no keep-float)."""

    res: object = None
    weights: str | None = None
    calib: str | Path | None = None
    calib_size: int = 256
    method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool | None = None
    eval_dir: str | Path | None = None
    labels: str | Path | None = None
    eval_size: int | None = None
    max_drop: float = 1.0
    keep_float: str | list[str] | None = None
    keep_float_max: int = AUTO_MAX_STEPS
    format: str = "onnx"
    weights_bits: int | None = None
    palettize: int | None = None
    sensitivity_samples: int | None = None   # None: 8 images when the table is needed, else none
    out: str | Path = "exports"
    force: bool = False
    threads: int = 2
    seed: int = 0
    reduce_range_note: str = ""
    int8_io: bool = False        # tflite: int8 inputs/outputs instead of float ones

    def validated(self) -> QuantizeOptions:
        if self.format not in FORMATS:
            raise EdgeExportError(f"unknown --format '{self.format}'; use onnx, coreml, pte or tflite")
        if self.method not in METHODS:
            raise EdgeExportError(f"unknown --method '{self.method}'; use one of: {', '.join(METHODS)}")
        if self.max_drop is None or not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise EdgeExportError(f"--max-drop must be a non-negative number of top-1 points, got {self.max_drop}")
        at_least_one("--eval-size", self.eval_size)
        check_threads(self.threads)
        if self.sensitivity_samples is not None and self.sensitivity_samples < 0:
            raise EdgeExportError(f"--sensitivity must be 0 or more images, got {self.sensitivity_samples}")
        keep = parse_keep_float(self.keep_float)
        at_least_one("--keep-float-max", self.keep_float_max)
        if self.int8_io and self.format != "tflite":
            raise EdgeExportError(f"--int8-io applies to --format tflite; --format {self.format} keeps float inputs "
                                  "and outputs")
        if self.format == "onnx":
            return self._validated_onnx(keep)
        if self.format in ("pte", "tflite"):
            return self._validated_pt2e(keep)
        return self._validated_coreml(keep)

    def sensitivity_images(self, needed: bool) -> int:
        """Images for the per-layer sensitivity table: as many as ``--sensitivity`` says (at least 4
        for keep-float auto), or by default 8 when the table is ``needed`` (the gate failed or
        keep-float auto runs) and none otherwise — at 1024² it costs more than calibrating."""
        auto = self.keep_float == "auto"
        if self.sensitivity_samples is None:
            return 8 if needed or auto else 0
        return max(self.sensitivity_samples, 4) if auto else self.sensitivity_samples

    def _static_int8(self, methods: tuple[str, ...]) -> None:
        """What both static int8 formats (ONNX QDQ, ExecuTorch PT2E) need."""
        if self.weights_bits is not None or self.palettize is not None:
            raise EdgeExportError(f"--weights-bits and --palettize apply to --format coreml; "
                                  f"--format {self.format} quantizes to static int8")
        if self.method not in methods:
            raise EdgeExportError(f"--method {self.method} does not apply to --format {self.format}; "
                                  f"use one of: {', '.join(methods)}")
        if self.calib is None:
            raise EdgeExportError("int8 quantization needs calibration images: pass --calib DIR (images like "
                                  "the ones the model will see) or --calib synthetic for a smoke run")
        at_least_one("--calib-size", self.calib_size)

    def _validated_pt2e(self, keep) -> QuantizeOptions:
        from ..exporters import get

        self._static_int8(PTE_METHODS)
        get(self.format).backend().validate_options()   # the runtime installed, else the one-line install command
        if self.reduce_range:
            raise EdgeExportError("--reduce-range applies to --format onnx (onnxruntime's u8s8 kernels); "
                                  "XNNPACK's int8 kernels take the full range")
        return dataclasses.replace(self, keep_float=keep, reduce_range=False)

    def _validated_onnx(self, keep) -> QuantizeOptions:
        self._static_int8(ONNX_METHODS)
        rr, note = (self.reduce_range, "") if self.reduce_range is not None else default_reduce_range()
        return dataclasses.replace(self, keep_float=keep, reduce_range=rr, reduce_range_note=note)

    def _validated_coreml(self, keep) -> QuantizeOptions:
        if keep is not None:
            raise EdgeExportError("--keep-float applies to --format onnx (Core ML compresses weights only)")
        if self.weights_bits is not None and self.palettize is not None:
            raise EdgeExportError("pass either --weights-bits 8 or --palettize N, not both")
        if self.palettize is not None and self.palettize not in PALETTE_BITS:
            raise EdgeExportError(f"--palettize takes 4, 6 or 8 bits, got {self.palettize}")
        if self.weights_bits is not None and self.weights_bits not in WEIGHT_BITS:
            raise EdgeExportError(f"--weights-bits takes 8 (linear int8), got {self.weights_bits}; "
                                  "for fewer bits use --palettize 4 or 6")
        bits = 8 if self.palettize is None and self.weights_bits is None else self.weights_bits
        return dataclasses.replace(self, keep_float=keep, reduce_range=False, weights_bits=bits)
