"""`ort_mobile.partitions`: onnxruntime's mobile usability checker, per phone EP, as numbers."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgevit_export.errors import EdgeExportError
from edgevit_export.ort_mobile import partitions

EPS = ("coreml_mlprogram", "coreml_neuralnetwork", "nnapi")


def _conv(name, inp, out, c_in, c_out, inits):
    w = numpy_helper.from_array(np.random.default_rng(len(inits)).standard_normal((c_out, c_in, 3, 3), np.float32),
                                f"{name}_w")
    inits.append(w)
    return helper.make_node("Conv", [inp, w.name], [out], name=name, pads=[1, 1, 1, 1])


def _save(path, nodes, inits, batch=1, c_out=4):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c_out, 8, 8])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def conv_relu(path, batch=1):
    inits = []
    return _save(path, [_conv("c0", "x", "h", 3, 4, inits), helper.make_node("Relu", ["h"], ["y"])],
                 inits, batch=batch)


def conv_erf_twice(path):
    """Conv → Erf → Conv → Erf → Relu: Erf is in Core ML's ML Program list only."""
    inits = []
    nodes = [_conv("c0", "x", "a", 3, 4, inits), helper.make_node("Erf", ["a"], ["b"]),
             _conv("c1", "b", "c", 4, 4, inits), helper.make_node("Erf", ["c"], ["d"]),
             helper.make_node("Relu", ["d"], ["y"])]
    return _save(path, nodes, inits)


@pytest.fixture(scope="module")
def shvit_onnx(onnx_s1_64):
    return onnx_s1_64.artifact


def test_fully_supported_graph_is_one_partition_everywhere(tmp_path, capfd):
    p = partitions(conv_relu(tmp_path / "conv_relu.onnx"))
    assert set(p) == set(EPS)
    for ep in EPS:
        assert p[ep] == {"partitions": 1, "nodes": 2, "supported_nodes": 2, "unsupported_ops": {},
                         "one_partition": True}, ep
    assert capfd.readouterr() == ("", "")


def test_unsupported_op_splits_the_graph(tmp_path):
    p = partitions(str(conv_erf_twice(tmp_path / "erf.onnx")))
    assert p["coreml_mlprogram"]["partitions"] == 1 and p["coreml_mlprogram"]["unsupported_ops"] == {}
    for ep in ("nnapi", "coreml_neuralnetwork"):
        assert p[ep]["unsupported_ops"] == {"Erf": 2}, ep
        assert p[ep]["partitions"] == 3 and not p[ep]["one_partition"], ep
        assert (p[ep]["nodes"], p[ep]["supported_nodes"]) == (5, 3), ep


def test_dynamic_batch_leaves_nothing_for_the_eps(tmp_path):
    """The checker requires fixed input shapes, so a symbolic batch puts every node on the CPU."""
    p = partitions(conv_relu(tmp_path / "dyn.onnx", batch="N"))
    for ep in EPS:
        assert p[ep]["partitions"] == 0 and p[ep]["supported_nodes"] == 0, ep
        assert p[ep]["unsupported_ops"] == {}, ep   # the ops are supported, the shapes are not


def test_shvit_s1(shvit_onnx, capfd):
    """SHViT-S1 (same as the zoo at 224): Core ML ML Program takes it whole; NNAPI and the older
    NeuralNetwork format lack InstanceNormalization (its GroupNorm) and split it up."""
    capfd.readouterr()
    p = partitions(shvit_onnx)
    assert capfd.readouterr() == ("", "")
    ml = p["coreml_mlprogram"]
    assert ml["one_partition"] and ml["unsupported_ops"] == {} and ml["supported_nodes"] == ml["nodes"]
    nnapi = p["nnapi"]
    assert nnapi["partitions"] == 10 and set(nnapi["unsupported_ops"]) == {"InstanceNormalization"}
    assert nnapi["supported_nodes"] + nnapi["unsupported_ops"]["InstanceNormalization"] == nnapi["nodes"]
    nn = p["coreml_neuralnetwork"]
    assert nn["partitions"] > 1 and "InstanceNormalization" in nn["unsupported_ops"]
    assert {ep: p[ep]["nodes"] for ep in EPS} == {ep: ml["nodes"] for ep in EPS}


def test_bad_paths_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    for bad in (tmp_path / "missing.onnx", tmp_path, junk):
        with pytest.raises(EdgeExportError) as e:
            partitions(bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(EdgeExportError):
        partitions(junk, optimize=False)
