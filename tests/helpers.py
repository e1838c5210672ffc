"""Plumbing shared by the model-family tests: ONNX parity against PyTorch, Core ML conversion,
random checkpoints. Imported as ``from helpers import ...`` (pytest puts tests/ on sys.path:
the folder has no ``__init__.py``, so the default import mode prepends it)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterable

import numpy as np
import pytest
import torch

# tqdm reads its TQDM_* overrides when it is first imported, so set this before coremltools is.
os.environ.setdefault("TQDM_DISABLE", "1")


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def onnx_rel_error(model: torch.nn.Module | torch.export.ExportedProgram, x: torch.Tensor, path,
                   *, program: torch.export.ExportedProgram | None = None) -> float:
    """Export with ``torch.onnx.export(..., dynamo=True)`` to ``path``, run the file in onnxruntime
    (CPU) and return ``max|ort − torch| / max|torch|``.

    ``model`` is what is exported and what gives the PyTorch reference (an ExportedProgram is run
    through ``.module()``). Pass ``program`` to export that instead while still comparing against
    ``model``, e.g. a program the test has already inspected. Skips when onnxruntime is missing.
    """
    ort = pytest.importorskip("onnxruntime")
    run = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    with torch.no_grad():
        ref = run(x).numpy()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(program if program is not None else model, (x,), str(path), dynamo=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _coreml_and_program(model, x):
    """coremltools (quiet; skips when missing) and the decomposed program of a module (exported
    on ``x``) or of an ExportedProgram."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with _quiet():
        ct = pytest.importorskip("coremltools")
    if isinstance(model, torch.export.ExportedProgram):
        return ct, model.run_decompositions({})
    return ct, torch.export.export(model.eval(), (x,)).run_decompositions({})


def coreml_convert(model: torch.nn.Module | torch.export.ExportedProgram, x: torch.Tensor | None = None):
    """Convert to a Core ML ML Program (iOS16) and return the ``MLModel`` (``x`` unused for an
    ExportedProgram); coremltools' output (progress bars, warnings) is swallowed."""
    ct, ep = _coreml_and_program(model, x)
    with _quiet():
        return ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16)


def coreml_rel_error(model: torch.nn.Module | torch.export.ExportedProgram, x: torch.Tensor, path) -> float:
    """Convert to an fp32 ML Program (iOS16), save it to ``path`` (``.mlpackage``), run the saved
    package in the Core ML reference runner on ``x``: max error relative to PyTorch's output scale."""
    from edgevit_export.exporters.coreml_runner import CoreMLRunner

    ct, ep = _coreml_and_program(model, x)
    with torch.no_grad():
        ref = ep.module()(x).numpy()
    with _quiet():
        ml = ct.convert(ep, inputs=[ct.TensorType(name="x", shape=tuple(x.shape))], outputs=[ct.TensorType(name="y")],
                        convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                        compute_precision=ct.precision.FLOAT32)
    ml.save(str(path))
    out = CoreMLRunner(path)({"x": x.numpy()})["y"]
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def random_state_dict(shapes: Iterable[tuple[str, tuple]], *, seed: int,
                      batches_tracked: int) -> dict[str, torch.Tensor]:
    """A checkpoint with the given keys and shapes and random values: ``num_batches_tracked`` set
    to ``batches_tracked``, running variances in [0.5, 1.5), everything else N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes:
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(batches_tracked)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.1
    return sd


ONE_LINE = ("error:", "check failed:")   # one-line messages by design: the terminal wraps them


def assert_fits_80(output: str) -> None:
    """Every line of ``output`` fits 80 columns and no value was cut by a table ("…"); the one-line
    error and check-failed messages are exempt from the width (they stay one line, to grep)."""
    for line in output.splitlines():
        if line.startswith(ONE_LINE):
            continue
        assert len(line) <= 80, f"{len(line)} columns: {line!r}"
        assert "…" not in line, f"a value cut short: {line!r}"
