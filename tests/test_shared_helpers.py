"""The helpers calibration/ and bench/ share with the rest of the package: one onnxruntime
session set-up, one set of output metrics, one labels-file reader, one progress renderer, and
quantize's flags checked once, up front."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from edgevit_export import metrics
from edgevit_export.bars import Bars
from edgevit_export.bench.matmul_peak import matmul_model
from edgevit_export.calibration.options import QuantizeOptions
from edgevit_export.errors import EdgeExportError
from edgevit_export.exporters.artifacts import size_bytes
from edgevit_export.labels import read_labels
from edgevit_export.ort import session, user_session
from edgevit_export.progress import Event, prefixed


def test_session_settings_and_spinning():
    model = matmul_model(8)
    for spinning, flag in ((True, "1"), (False, "0")):
        s = session(model, threads=1, spinning=spinning, optimize=False)
        so = s.get_session_options()
        assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == flag
        x = np.eye(8, dtype=np.float32)
        assert s.run(None, {"X": x})[0].shape == (8, 8)


def test_user_session_says_what_cannot_load(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EdgeExportError, match="onnxruntime cannot load .*bad.onnx"):
        user_session(bad)


def test_metrics_rows():
    a = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    assert metrics.cosine(a, 2 * a) == pytest.approx([1.0, 1.0])
    assert metrics.top1_agreement(a, a[:, [0, 2, 1]]) == 0.5
    assert metrics.top1_agreement(a[:0], a[:0]) == 0.0
    assert metrics.sqnr_db(a, a) == float("inf") and metrics.sqnr_db(a, 1.1 * a) == pytest.approx(20.0)


@pytest.mark.parametrize("content, message", [
    (None, "--labels file not found"),
    (b"\n \n", "is empty"),
    (b"\xff\xfe\x00bad", "is not UTF-8 text"),
    (b"cat\ndog\ncat\n", "lists 'cat' more than once"),
])
def test_read_labels_one_line_errors(tmp_path, content, message):
    p = tmp_path / "labels.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(EdgeExportError, match=message):
        read_labels(p)


def test_read_labels_reads_names(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text(" cat \n\ndog\n")
    assert read_labels(p) == ["cat", "dog"]


def test_size_bytes_of_file_and_directory(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a").write_bytes(b"x" * 3)
    (tmp_path / "d" / "sub" / "b").write_bytes(b"x" * 4)
    assert size_bytes(tmp_path / "d") == 7 and size_bytes(tmp_path / "d" / "a") == 3


@pytest.mark.parametrize("kw, message", [
    (dict(format="tfl"), "unknown --format 'tfl'"),
    (dict(int8_io=True), "--int8-io applies to --format tflite"),
    (dict(max_drop=float("nan")), "--max-drop must be a non-negative number"),
    (dict(threads=0), "--threads must be 1 to 1024, got 0"),
    (dict(threads=100000), "--threads must be 1 to 1024, got 100000"),
    (dict(calib_size=0), "--calib-size must be at least 1"),
    (dict(calib=None), "needs calibration images"),
    (dict(keep_float=" , "), "--keep-float needs 'auto' or node names"),
    (dict(format="coreml", weights_bits=8, palettize=4), "not both"),
])
def test_quantize_options_reject_bad_flags(kw, message):
    with pytest.raises(EdgeExportError, match=message):
        QuantizeOptions(**{"calib": "synthetic", **kw}).validated()


def test_quantize_options_fill_in_defaults():
    o = QuantizeOptions(format="coreml").validated()
    assert o.weights_bits == 8 and o.reduce_range is False and o.keep_float is None
    o = QuantizeOptions(calib="synthetic", keep_float="a, b").validated()
    assert o.keep_float == ["a", "b"] and o.reduce_range is True and "every CPU" in o.reduce_range_note
    assert QuantizeOptions(calib="synthetic", reduce_range=False).validated().reduce_range_note == ""


def test_bars_render_stages_and_counted_tasks():
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=False)
    with Bars(console) as bars:
        step = prefixed(bars, "export: ")
        step(Event("capture"))               # a stage
        bars(Event("calibrate", 0, 4))
        bars(Event("calibrate", 4, 4))
    text = out.getvalue()
    assert "✓ export: capture" in text and "calibrate" in text and "4/4" in text
