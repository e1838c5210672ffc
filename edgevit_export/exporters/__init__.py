"""Formats: one module per format, one contract, one table.

Every format module (``onnx.py``, ``coreml.py``, …) offers the same functions, and nothing outside
it knows the format:

- ``validate_options(**flags) -> dict``: the flags that concern it, checked before any work;
- ``convert(program, example, path, options, meta) -> dict``: write the artifact; returns what
  the manifest records about the backend, including ``"io"`` (inputs and outputs);
- ``load(path) -> Runner``: ``runner(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]``,
  with ``runner.inputs`` / ``runner.outputs`` (name, shape, dtype, kind) and
  ``runner.numeric(inputs)``: the outputs that PyTorch's model also computes (logits, feature maps),
  which is what parity compares — a classifier's probabilities and label come from them; runtimes
  that ``bench`` times through the Runner (ExecuTorch, LiteRT) add ``runner.prepared(inputs)``, the
  zero-argument call with the inputs already set, which is what a latency measurement times;
- ``describe(path) -> dict``: structural facts (op counts by type, max rank, dtypes, static shapes);
- ``structure(facts, options) -> dict``: the format's structural check on those facts;
- ``gate(options, trained) -> Gate``: what parity is held to.

Registering a format is one entry in :data:`FORMATS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeExportError


@dataclass(frozen=True)
class Format:
    name: str
    module: str               # the format module, imported on first use
    suffix: str               # the artifact's suffix
    tag: str                  # between the artifact's stem and .json / .golden.npz (formats can share a folder)
    title: str
    passes: tuple[str, ...] = ()  # the default pass pipeline: what this runtime needs rewritten
    max_rank: int | None = None   # the runtime's tensor rank limit, checked before conversion

    def backend(self):
        return importlib.import_module(self.module)

    def manifest_path(self, artifact: Path) -> Path:
        return artifact.with_name(f"{artifact.stem}{self.tag}.json")

    def golden_path(self, artifact: Path) -> Path:
        return artifact.with_name(f"{artifact.stem}{self.tag}.golden.npz")


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", "edgevit_export.exporters.onnx", ".onnx", "", "ONNX",
           ("static_shapes", "fold_batchnorm", "rank_le5", "cancel_reshapes")),
    Format("coreml", "edgevit_export.exporters.coreml", ".mlpackage", ".coreml", "Core ML",
           ("static_shapes", "fold_batchnorm", "rank_le5", "cancel_reshapes", "linear_to_conv", "normalize_input"),
           max_rank=5),
    Format("pte", "edgevit_export.exporters.pte", ".pte", ".pte", "ExecuTorch",
           ("static_shapes", "fold_constants", "fold_batchnorm", "rank_le5", "cancel_reshapes", "split_to_slices",
            "matmul_to_bmm", "decompose_norms", "mean_as_gemm", "float_scalars",
            "views_as_reshape", "softmax_rows")),
    Format("tflite", "edgevit_export.exporters.tflite", ".tflite", ".tflite", "LiteRT",
           ("static_shapes", "fold_batchnorm", "rank_le5", "cancel_reshapes", "grid_sample_gather", "deconv_as_shuffle",
            "token_maps", "matmul_as_einsum")),
)}


def get(name: str) -> Format:
    key = str(name).strip().lower()          # --format ONNX, CoreML
    if key not in FORMATS:
        raise EdgeExportError(f"unknown format '{name}'; use one of: {', '.join(FORMATS)}")
    return FORMATS[key]


def of_artifact(path: str | Path) -> Format:
    """The format of an artifact on disk, by its suffix."""
    p = Path(path).expanduser()
    fmt = next((f for f in FORMATS.values() if p.suffix == f.suffix), None)
    if fmt is None:
        known = ", ".join(f"{f.suffix} ({f.title})" for f in FORMATS.values())
        raise EdgeExportError(f"{p} is not an artifact this tool runs; give one of: {known}")
    if not p.exists():
        raise EdgeExportError(f"artifact not found: {p}")
    return fmt


def load(path: str | Path):
    """The Runner of any artifact: ``load("exports/shvit_s4-1024.mlpackage")(inputs)``."""
    return of_artifact(path).backend().load(Path(path).expanduser())


@dataclass
class Meta:
    """What every format is told about the artifact besides the program (metadata, the head)."""

    model: str
    family: str
    paper: str
    res: tuple[int, int]
    params: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    passes: list[str]
    num_classes: int
    preprocess: str = ""     # the eval transform an app applies first (Preprocess.describe()), for metadata
    features: list | None = None   # a backbone export: its outputs (features.Feature), else a classifier

    @property
    def output_names(self) -> list[str] | None:
        """The program's output names where they are ours to give (a backbone's ``feat_s<stride>``)."""
        return [f.name for f in self.features] if self.features else None
