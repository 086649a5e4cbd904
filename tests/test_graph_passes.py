"""The exporter's encoder-graph rewrites (export/graph_passes.py): what they match, what they
leave alone, and that the rewritten encoder computes what jax2onnx's graph computes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from rep_medsam_jax.export import graph_passes as gp
from rep_medsam_jax.models.config import REPVIT_VARIANTS


def _run(model, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture(scope="module")
def raw_tiny_encoder(tiny_model_dir):
    """jax2onnx's graph of the folded tiny encoder, before any rewrite."""
    from rep_medsam_jax.export import onnx_export

    config, encode, _ = onnx_export.deployed_functions(tiny_model_dir)
    return onnx_export.encoder_to_onnx(encode, config.image_size)


def test_rewrites_match_every_squeeze_excite_gate_and_keep_the_values(raw_tiny_encoder):
    se_rows = sum(row[3] for row in REPVIT_VARIANTS["rep_medsam_tiny"].rows)
    ops_before = [node.op_type for node in raw_tiny_encoder.graph.node]
    assert ops_before.count("Expand") == se_rows        # one broadcast gate per SE block

    rewritten = copy.deepcopy(raw_tiny_encoder)
    assert gp.drop_broadcast_expands(rewritten) == se_rows
    assert gp.squeeze_excite_blocked(rewritten) == se_rows
    ops = [node.op_type for node in rewritten.graph.node]
    assert "Expand" not in ops and "Gemm" not in ops
    assert ops.count("GlobalAveragePool") == ops.count("Resize") == se_rows
    # Only the two LayerNorms of the neck still take a ReduceMean (mean and variance each).
    assert ops.count("ReduceMean") == 4

    images = np.random.default_rng(0).random((3, 256, 256, 3), dtype=np.float32)
    before = _run(raw_tiny_encoder, {"images": images})[0]
    after = _run(rewritten, {"images": images})[0]
    # The same maths; only the summation order of the spatial mean and the FC products moves.
    assert np.max(np.abs(after - before)) <= 1e-5 * max(1.0, float(np.max(np.abs(before))))
    # And per image: the batch stays symbolic through the added shape annotations.
    single = _run(rewritten, {"images": images[1:2]})[0]
    np.testing.assert_allclose(single[0], after[1], rtol=0, atol=1e-5)


def test_the_export_applies_the_rewrites_and_records_them(tiny_export_dir):
    import onnx

    se_rows = sum(row[3] for row in REPVIT_VARIANTS["rep_medsam_tiny"].rows)
    meta = json.loads((tiny_export_dir / "export.json").read_text())
    assert meta["encoder_graph_rewrites"] == {"broadcast_expands_dropped": se_rows,
                                              "squeeze_excite_blocked": se_rows}
    ops = [n.op_type for n in onnx.load(str(tiny_export_dir / "encoder.onnx")).graph.node]
    assert ops.count("GlobalAveragePool") == se_rows and "Expand" not in ops


def _graph(nodes, inputs, outputs, initializers=()):
    from onnx import TensorProto, helper

    def values(specs):
        return [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
                for name, shape in specs]

    graph = helper.make_graph(nodes, "g", values(inputs), values(outputs), list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _shape_constant(name, values):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def test_expand_feeding_a_broadcasting_op_is_dropped_with_its_shape_arithmetic():
    from onnx import helper

    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Expand", ["g", "shape"], ["g_full"]),
             helper.make_node("Mul", ["x", "g_full"], ["y"])]
    model = _graph(nodes, [("x", [2, 3, 4]), ("g", [2, 1, 4])], [("y", [2, 3, 4])])
    feeds = {"x": np.random.rand(2, 3, 4).astype(np.float32),
             "g": np.random.rand(2, 1, 4).astype(np.float32)}
    want = _run(model, feeds)[0]
    assert gp.drop_broadcast_expands(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Mul"]
    np.testing.assert_array_equal(_run(model, feeds)[0], want)


@pytest.mark.parametrize("case", ["non_binary_consumer", "graph_output", "both_expanded"])
def test_expands_that_carry_a_shape_are_kept(case):
    from onnx import helper

    shape = _shape_constant("shape", [2, 3, 4])
    if case == "non_binary_consumer":      # Relu does not broadcast: the Expand makes the shape
        nodes = [helper.make_node("Expand", ["g", "shape"], ["g_full"]),
                 helper.make_node("Relu", ["g_full"], ["y"])]
        inputs = [("g", [2, 1, 4])]
    elif case == "graph_output":           # the model's own output shape depends on it
        nodes = [helper.make_node("Expand", ["g", "shape"], ["y"])]
        inputs = [("g", [2, 1, 4])]
    else:                                  # neither operand would keep the full shape
        nodes = [helper.make_node("Expand", ["g", "shape"], ["g_full"]),
                 helper.make_node("Expand", ["h", "shape"], ["h_full"]),
                 helper.make_node("Add", ["g_full", "h_full"], ["y"])]
        inputs = [("g", [2, 1, 4]), ("h", [1, 3, 1])]
    model = _graph(nodes, inputs, [("y", [2, 3, 4])], [shape])
    before = [n.op_type for n in model.graph.node]
    assert gp.drop_broadcast_expands(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_a_gate_with_other_readers_is_not_rewritten(raw_tiny_encoder):
    """The SE match needs each step of the gate to have one reader: a second reader of the
    pooled vector (say, an extra output) would lose its input if the gate were replaced."""
    from onnx import helper

    model = copy.deepcopy(raw_tiny_encoder)
    gp.drop_broadcast_expands(model)
    means = [n for n in model.graph.node if n.op_type == "ReduceMean"]
    pooled = means[0].output[0]                 # the first SE gate's spatial mean (B, C)
    model.graph.node.append(helper.make_node("Identity", [pooled], ["pooled_copy"]))
    model.graph.output.append(helper.make_empty_tensor_value_info("pooled_copy"))
    se_rows = sum(row[3] for row in REPVIT_VARIANTS["rep_medsam_tiny"].rows)
    assert gp.squeeze_excite_blocked(model) == se_rows - 1
