"""The exporter's graph rewrites (export/graph_passes.py): what they match, what they leave
alone, and that the rewritten encoder and decoder compute what jax2onnx's graphs compute."""

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
    from rep_medsam_jax.model_dir import load_model_dir
    from rep_medsam_jax.models.deploy import deployed_functions

    config, encode, _ = deployed_functions(*load_model_dir(tiny_model_dir))
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
    layer_norms = 4 * meta["model"]["decoder"]["depth"] + 2
    assert meta["decoder_graph_rewrites"] == {"layer_norms_fused": layer_norms}
    decoder_ops = [n.op_type for n in onnx.load(str(tiny_export_dir / "decoder.onnx")).graph.node]
    assert decoder_ops.count("LayerNormalization") == layer_norms
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


@pytest.fixture(scope="module")
def raw_tiny_decoder(tiny_model_dir):
    """jax2onnx's graph of the tiny model's prompt encoder + mask decoder, before any rewrite,
    with the JAX function it was traced from."""
    import jax

    from rep_medsam_jax.export import onnx_export
    from rep_medsam_jax.model_dir import load_model_dir
    from rep_medsam_jax.models.deploy import deployed_functions

    config, _, decode = deployed_functions(*load_model_dir(tiny_model_dir))
    grid, channels = config.embedding_size, config.decoder.embed_dim
    proto = onnx_export._to_onnx(decode, [(1, grid, grid, channels),
                                          jax.ShapeDtypeStruct(("N", 4), np.float32)],
                                 "prompt_decoder", ["embedding", "boxes"],
                                 ["low_res_logits", "iou"])
    return config, decode, proto


def test_every_decoder_layer_norm_is_fused_and_the_outputs_kept(raw_tiny_decoder):
    """SAM's decoder has 4 LayerNorms per two-way block, the final attention's, and the
    upscaling's LayerNorm2d (the other order of the scale); all become LayerNormalization."""
    config, decode, raw = raw_tiny_decoder
    layer_norms = 4 * config.decoder.depth + 2
    assert [n.op_type for n in raw.graph.node].count("ReduceMean") == 2 * layer_norms

    fused = copy.deepcopy(raw)
    assert gp.fuse_layer_norms(fused) == layer_norms
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("LayerNormalization") == layer_norms and "ReduceMean" not in ops
    assert ops.count("Sqrt") == [n.op_type for n in raw.graph.node].count("Sqrt") - layer_norms

    rng = np.random.default_rng(5)
    grid, channels = config.embedding_size, config.decoder.embed_dim
    embedding = rng.normal(size=(1, grid, grid, channels)).astype(np.float32)
    size = config.image_size
    boxes = np.sort(rng.uniform(0, size, (5, 2, 2)), axis=1).reshape(5, 4)[:, [0, 2, 1, 3]]
    feeds = {"embedding": embedding, "boxes": boxes.astype(np.float32)}
    before, after = _run(raw, feeds), _run(fused, feeds)
    want = [np.asarray(out) for out in decode(embedding, feeds["boxes"])]
    for b, a, w in zip(before, after, want):
        scale = max(1.0, float(np.max(np.abs(w))))
        assert np.max(np.abs(a - b)) <= 1e-5 * scale
        assert np.max(np.abs(a - w)) <= 1e-4 * scale


def _layer_norm_graph(order: str, axes=(-1,), extra_reader: bool = False):
    """x (2, 3, 8) normalised over its last axis, in jax2onnx's spelling (see
    graph_passes._match_layer_norm): scale inside (``c * (r * s)``) or outside
    (``(c * r) * s``)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    scale = rng.normal(size=(1, 1, 8)).astype(np.float32)
    bias = rng.normal(size=(1, 1, 8)).astype(np.float32)
    constants = [_shape_constant("axes", list(axes)),
                 numpy_helper.from_array(np.float32(1e-5), "eps"),
                 numpy_helper.from_array(np.float32(1.0), "one"),
                 numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")]
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
             helper.make_node("Sub", ["x", "mean"], ["c"]),
             helper.make_node("Mul", ["c", "c"], ["c2"]),
             helper.make_node("ReduceMean", ["c2", "axes"], ["var"], keepdims=1),
             helper.make_node("Add", ["var", "eps"], ["var_eps"]),
             helper.make_node("Sqrt", ["var_eps"], ["std"]),
             helper.make_node("Div", ["one", "std"], ["r"])]
    if order == "scale_inside":
        nodes += [helper.make_node("Mul", ["r", "scale"], ["rs"]),
                  helper.make_node("Mul", ["c", "rs"], ["scaled"])]
    else:
        nodes += [helper.make_node("Mul", ["c", "r"], ["cr"]),
                  helper.make_node("Mul", ["cr", "scale"], ["scaled"])]
    nodes.append(helper.make_node("Add", ["scaled", "bias"], ["y"]))
    outputs = [("y", [2, 3, 8])]
    if extra_reader:                        # the centred values are also a model output
        nodes.append(helper.make_node("Identity", ["c"], ["c_out"]))
        outputs.append(("c_out", [2, 3, 8]))
    model = _graph(nodes, [("x", [2, 3, 8])], outputs, constants)
    return model, scale.ravel(), bias.ravel()


@pytest.mark.parametrize("order", ["scale_inside", "scale_outside"])
def test_a_spelled_out_layer_norm_becomes_one_node_with_the_same_values(order):
    model, scale, bias = _layer_norm_graph(order)
    x = (np.random.default_rng(2).normal(size=(2, 3, 8)) * 3 + 5).astype(np.float32)
    assert gp.fuse_layer_norms(model) == 1
    (node,) = model.graph.node
    assert node.op_type == "LayerNormalization"
    assert len(model.graph.initializer) == 2        # the old constants are gone
    x64 = x.astype(np.float64)
    want = ((x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
            * scale + bias)
    np.testing.assert_allclose(_run(model, {"x": x})[0], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["other_axis", "extra_reader"])
def test_layer_norms_that_cannot_be_fused_are_left_alone(case):
    """A mean over another axis is not LayerNormalization(axis=-1); centred values read
    elsewhere would lose their producer."""
    model, _, _ = _layer_norm_graph("scale_inside", axes=(1,) if case == "other_axis" else (-1,),
                                    extra_reader=case == "extra_reader")
    before = [n.op_type for n in model.graph.node]
    assert gp.fuse_layer_norms(model) == 0
    assert [n.op_type for n in model.graph.node] == before
