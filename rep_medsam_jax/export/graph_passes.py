"""Value-preserving rewrites of jax2onnx's graphs for onnxruntime: the encoder's kept in its fast
layout, the decoder's LayerNorms fused.

onnxruntime runs the encoder's convolutions in a channel-blocked layout (NCHWc: channels in
blocks of 8 or 16 innermost) and re-lays tensors out (ReorderInput / ReorderOutput, each a pass
over the tensor) wherever an op it cannot run blocked sits between two convolutions. Two
patterns in jax2onnx's output force such re-layouts in every squeeze-excite (SE) block:

* ``x * gate[:, None, None, :]`` traces to ``broadcast_in_dim`` + ``mul``; with a symbolic batch
  jax2onnx writes the broadcast as Shape/Gather/Concat/Reshape/Expand, and the dynamic Expand
  stops onnxruntime's transpose optimiser, so the gate, the Mul and the block's residual Add
  stay in NHWC between NCHW convolutions (:func:`drop_broadcast_expands`);
* the SE gate itself (spatial ReduceMean, two Gemms) and the gate Mul with a (B, C, 1, 1)
  operand have no blocked form: onnxruntime blocks GlobalAveragePool, 1x1 Conv, nearest Resize
  with static scales and a Mul of two equal-shape blocked tensors, so the gate is rewritten
  into those ops (:func:`squeeze_excite_blocked`).

Both rewrites compute the same values (the first exactly, the second up to float summation
order: a mean by GlobalAveragePool instead of ReduceMean, a 1x1 Conv instead of a Gemm), and the
exporter verifies the rewritten model against JAX like any other. Measured on the full-size
encoder: docs/benchmarks.md.

The decoder normalises (N, 4096, 256) token tensors and the (N, 128, 128, 64) upscaled map per
box; jax2onnx writes each LayerNorm as ten elementwise and reduction ops that onnxruntime does
not fuse, so :func:`fuse_layer_norms` puts one LayerNormalization node in their place.
"""

from __future__ import annotations

import numpy as np

# lax's binary ops take operands of one shape, so in a graph traced from JAX an Expand that
# feeds one of these only restates the other operand's shape, which ONNX broadcasting implies.
_BROADCASTING_BINARY_OPS = ("Add", "Sub", "Mul", "Div")


def tensor_readers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it, each once (``Mul(c, c)`` is one reader of c)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            consumers.setdefault(name, []).append(node)
    return consumers


def _producers(graph) -> dict[str, object]:
    return {name: node for node in graph.node for name in node.output}


def _remove_dead_nodes(graph) -> None:
    """Drop nodes none of whose outputs is used (the shape arithmetic of a dropped Expand)."""
    outputs = {value.name for value in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(o in used for o in node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _remove_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)


def _splice(graph, replacements: dict[int, list], removed: set[int]) -> None:
    """Rebuild the node list: each node whose id is in ``replacements`` gives way to its list
    of new nodes, nodes in ``removed`` go; then drop what no longer feeds anything."""
    nodes = []
    for node in graph.node:
        if id(node) in replacements:
            nodes.extend(replacements[id(node)])
        elif id(node) not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _remove_dead_nodes(graph)
    _remove_unused_initializers(graph)


def drop_broadcast_expands(model) -> int:
    """Feed each Expand's input straight to its consumers where they are broadcasting binary
    ops whose other operand already has the full shape. Returns the number of Expands removed.

    Exact: ONNX's numpy-style broadcasting gives the same values the Expand made explicit.
    """
    graph = model.graph
    consumers = tensor_readers(graph)
    producers = _producers(graph)
    graph_outputs = {value.name for value in graph.output}
    removed = 0
    for node in list(graph.node):
        if node.op_type != "Expand" or node.output[0] in graph_outputs:
            continue
        expanded = node.output[0]
        users = consumers.get(expanded, [])
        if not users or any(user.op_type not in _BROADCASTING_BINARY_OPS
                            or len(user.input) != 2 for user in users):
            continue
        # The other operand must carry the full shape itself, not through another Expand.
        others = [user.input[1] if user.input[0] == expanded else user.input[0]
                  for user in users]
        if any(other == expanded or getattr(producers.get(other), "op_type", None) == "Expand"
               for other in others):
            continue
        for user in users:
            for index, name in enumerate(user.input):
                if name == expanded:
                    user.input[index] = node.input[0]
        removed += 1
    if removed:
        _remove_dead_nodes(graph)
        _remove_unused_initializers(graph)
    return removed


def _constant(graph, name: str) -> np.ndarray | None:
    from onnx import numpy_helper  # noqa: PLC0415

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def _attribute(node, name: str, default=None):
    from onnx import helper  # noqa: PLC0415

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _only_consumer(consumers: dict, name: str, op_type: str):
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _reshape_of_gate(consumers: dict, gate: str):
    """The Reshape of the gate to (B, 1, 1, C); jax2onnx also reads the gate's Shape for the
    symbolic batch of the target shape (that arithmetic dies with the Reshape)."""
    users = consumers.get(gate, [])
    reshapes = [user for user in users if user.op_type == "Reshape"]
    if len(reshapes) != 1 or any(user.op_type not in ("Reshape", "Shape") for user in users):
        return None
    return reshapes[0]


def _plain_gemm(graph, node) -> tuple[np.ndarray, np.ndarray] | None:
    """(W (in, out), b (out,)) of ``y = x @ W + b`` with constant W and b, else None."""
    if node is None or len(node.input) != 3:
        return None
    if (_attribute(node, "transA", 0), _attribute(node, "transB", 0)) != (0, 0):
        return None
    if (_attribute(node, "alpha", 1.0), _attribute(node, "beta", 1.0)) != (1.0, 1.0):
        return None
    weight, bias = _constant(graph, node.input[1]), _constant(graph, node.input[2])
    if weight is None or bias is None or weight.ndim != 2 or bias.shape != weight.shape[1:]:
        return None
    return weight, bias


def _match_squeeze_excite(graph, mean, consumers, producers) -> dict | None:
    """The jax2onnx form of ``SqueezeExcite`` (after :func:`drop_broadcast_expands`)::

        t = Transpose(x, perm=[0, 2, 3, 1])            x: (B, C, H, W), the conv output
        p = ReduceMean(t, axes=[1, 2], keepdims=0)     (B, C)
        g = Sigmoid(Gemm(Relu(Gemm(p, W1, b1)), W2, b2))
        y = Mul(t, Reshape(g, (B, 1, 1, C)))           (B, H, W, C)
    """
    transpose = producers.get(mean.input[0])
    if transpose is None or transpose.op_type != "Transpose":
        return None
    if list(_attribute(transpose, "perm", [])) != [0, 2, 3, 1]:
        return None
    axes = _constant(graph, mean.input[1]) if len(mean.input) > 1 else None
    if axes is None or sorted(int(a) for a in axes.ravel()) != [1, 2]:
        return None
    if _attribute(mean, "keepdims", 1) != 0:
        return None
    gemm1 = _only_consumer(consumers, mean.output[0], "Gemm")
    relu = gemm1 and _only_consumer(consumers, gemm1.output[0], "Relu")
    gemm2 = relu and _only_consumer(consumers, relu.output[0], "Gemm")
    sigmoid = gemm2 and _only_consumer(consumers, gemm2.output[0], "Sigmoid")
    reshape = sigmoid and _reshape_of_gate(consumers, sigmoid.output[0])
    mul = reshape and _only_consumer(consumers, reshape.output[0], "Mul")
    if mul is None or transpose.output[0] not in mul.input:
        return None
    fc1, fc2 = _plain_gemm(graph, gemm1), _plain_gemm(graph, gemm2)
    if fc1 is None or fc2 is None:
        return None
    return {"x": transpose.input[0], "fc1": fc1, "fc2": fc2, "mul": mul,
            "removed": [mean, gemm1, relu, gemm2, sigmoid, reshape, mul]}


def squeeze_excite_blocked(model) -> int:
    """Rewrite every SE gate into ops onnxruntime runs in its blocked layout::

        gate = Sigmoid(Conv1x1(Relu(Conv1x1(GlobalAveragePool(x)))))     (B, C, 1, 1)
        y    = Transpose(Mul(x, Resize_nearest(gate, scales=[1, 1, H, W])), [0, 2, 3, 1])

    The trailing Transpose restores the NHWC tensor the rest of the graph reads (onnxruntime
    cancels it against the next conv's). Shape annotations are added for the two (B, C, H, W)
    operands of the Mul: onnxruntime runs a Mul blocked only when it can prove the shapes
    equal, and shape inference loses the symbolic batch through Resize. Needs static H and W
    (the encoder's input size is fixed). Returns the number of gates rewritten.
    """
    import onnx  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    shapes = {}
    for value in onnx.shape_inference.infer_shapes(model).graph.value_info:
        shapes[value.name] = value.type.tensor_type.shape
    consumers, producers = tensor_readers(graph), _producers(graph)

    replacements: dict[int, list] = {}
    removed: set[int] = set()
    annotations = []
    for node in graph.node:
        if node.op_type != "ReduceMean":
            continue
        match = _match_squeeze_excite(graph, node, consumers, producers)
        shape = match and shapes.get(match["x"])
        if shape is None or len(shape.dim) != 4:
            continue
        height, width = (dim.dim_value for dim in shape.dim[2:])
        if height <= 0 or width <= 0:
            continue
        index = len(replacements)
        prefix = f"se_blocked_{index}"
        (w1, b1), (w2, b2) = match["fc1"], match["fc2"]
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(w1.T)[:, :, None, None], f"{prefix}_w1"),
            numpy_helper.from_array(b1, f"{prefix}_b1"),
            numpy_helper.from_array(np.ascontiguousarray(w2.T)[:, :, None, None], f"{prefix}_w2"),
            numpy_helper.from_array(b2, f"{prefix}_b2"),
            numpy_helper.from_array(np.array([1, 1, height, width], np.float32),
                                    f"{prefix}_scales"),
        ])
        x = match["x"]
        replacements[id(match["mul"])] = [
            helper.make_node("GlobalAveragePool", [x], [f"{prefix}_pooled"]),
            helper.make_node("Conv", [f"{prefix}_pooled", f"{prefix}_w1", f"{prefix}_b1"],
                             [f"{prefix}_fc1"]),
            helper.make_node("Relu", [f"{prefix}_fc1"], [f"{prefix}_hidden"]),
            helper.make_node("Conv", [f"{prefix}_hidden", f"{prefix}_w2", f"{prefix}_b2"],
                             [f"{prefix}_fc2"]),
            helper.make_node("Sigmoid", [f"{prefix}_fc2"], [f"{prefix}_gate"]),
            helper.make_node("Resize", [f"{prefix}_gate", "", f"{prefix}_scales"],
                             [f"{prefix}_gate_full"], mode="nearest",
                             coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
            helper.make_node("Mul", [x, f"{prefix}_gate_full"], [f"{prefix}_gated"]),
            helper.make_node("Transpose", [f"{prefix}_gated"], [match["mul"].output[0]],
                             perm=[0, 2, 3, 1]),
        ]
        removed.update(id(n) for n in match["removed"])
        dims = [dim.dim_param or dim.dim_value for dim in shape.dim]
        for name in (x, f"{prefix}_gate_full"):
            annotations.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                             dims))
    if not replacements:
        return 0
    _splice(graph, replacements, removed)
    graph.value_info.extend(annotations)
    return len(replacements)


def _other_input(node, name: str) -> str | None:
    """The input of a two-input node that is not ``name`` (None if name is not an input)."""
    if len(node.input) != 2 or name not in node.input:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _reduced_axes(graph, node) -> list[int] | None:
    axes = _constant(graph, node.input[1]) if len(node.input) > 1 else None
    if axes is None:
        axes = _attribute(node, "axes")
    return None if axes is None else [int(a) for a in np.ravel(axes)]


def _match_layer_norm(graph, mean, consumers) -> dict | None:
    """The jax2onnx form of a LayerNorm over the last axis (``LayerNorm``, ``LayerNorm2d``)::

        c = Sub(x, ReduceMean(x, axes=[-1], keepdims=1))
        r = Div(1, Sqrt(Add(ReduceMean(Mul(c, c), axes=[-1], keepdims=1), eps)))
        y = Add(Mul(c, Mul(r, scale)), bias)      or      y = Add(Mul(Mul(c, r), scale), bias)

    with constant eps, scale and bias (shapes (1, ..., 1, C): lax broadcasts to full rank).
    """
    axes = _reduced_axes(graph, mean)
    if axes is None or len(axes) != 1 or _attribute(mean, "keepdims", 1) != 1:
        return None
    x = mean.input[0]
    sub = _only_consumer(consumers, mean.output[0], "Sub")
    if sub is None or list(sub.input) != [x, mean.output[0]]:
        return None
    centered = sub.output[0]
    readers = consumers.get(centered, [])
    squares = [node for node in readers if list(node.input) == [centered, centered]]
    if len(readers) != 2 or len(squares) != 1 or any(n.op_type != "Mul" for n in readers):
        return None
    square = squares[0]
    scaled = readers[0] if readers[1] is square else readers[1]
    variance = _only_consumer(consumers, square.output[0], "ReduceMean")
    if variance is None or _reduced_axes(graph, variance) != axes:
        return None
    add_eps = _only_consumer(consumers, variance.output[0], "Add")
    eps = add_eps and _constant(graph, _other_input(add_eps, variance.output[0]) or "")
    sqrt = add_eps and _only_consumer(consumers, add_eps.output[0], "Sqrt")
    div = sqrt and _only_consumer(consumers, sqrt.output[0], "Div")
    if div is None or eps is None or eps.size != 1 or list(div.input[1:]) != [sqrt.output[0]]:
        return None
    one = _constant(graph, div.input[0])
    if one is None or one.size != 1 or float(one) != 1.0:
        return None
    inverse = div.output[0]
    times_scale = _only_consumer(consumers, inverse, "Mul")
    if times_scale is not None and times_scale is not scaled:      # c * (r * scale)
        scale_name = _other_input(times_scale, inverse)
        if _other_input(scaled, centered) != times_scale.output[0]:
            return None
        last_mul = scaled
    else:                                                          # (c * r) * scale
        if _other_input(scaled, centered) != inverse:
            return None
        last_mul = _only_consumer(consumers, scaled.output[0], "Mul")
        scale_name = last_mul and _other_input(last_mul, scaled.output[0])
    add_bias = last_mul and _only_consumer(consumers, last_mul.output[0], "Add")
    bias_name = add_bias and _other_input(add_bias, last_mul.output[0])
    scale = _constant(graph, scale_name or "")
    bias = _constant(graph, bias_name or "")
    if scale is None or bias is None or scale.shape != bias.shape or scale.ndim == 0:
        return None
    rank = scale.ndim
    if axes[0] not in (-1, rank - 1) or scale.shape[:-1] != (1,) * (rank - 1):
        return None
    removed = [mean, sub, square, variance, add_eps, sqrt, div, scaled, last_mul, add_bias]
    if times_scale is not None and times_scale is not scaled:
        removed.append(times_scale)
    return {"x": x, "scale": scale.ravel(), "bias": bias.ravel(), "epsilon": float(eps),
            "y": add_bias.output[0], "last": add_bias, "removed": removed}


def fuse_layer_norms(model) -> int:
    """Replace each LayerNorm that jax2onnx spelled out in ten elementwise and reduction ops
    (:func:`_match_layer_norm`) by one ONNX ``LayerNormalization`` node over the last axis.

    onnxruntime's own fusion does not recognise jax2onnx's form (a reciprocal square root,
    the scale multiplied in before or after the centred values), so without this pass the
    decoder makes about eight passes over each tensor it normalises (full-size decoder: 0.91x the time for 1 box,
    0.85x for 16; docs/benchmarks.md). Not bit-exact, as the kernel rounds in its own order:
    against a float64 LayerNorm of 256 channels its error is 6e-7 for centred inputs and
    4e-6 with a mean 100x the spread (the two-pass float32 form: 5e-7, 1e-5); the exporter
    verifies the result against JAX as for any model. Returns the number of LayerNorms fused.
    """
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    consumers = tensor_readers(graph)
    graph_outputs = {value.name for value in graph.output}
    replacements: dict[int, list] = {}
    removed: set[int] = set()
    for node in graph.node:
        if node.op_type != "ReduceMean" or id(node) in removed:
            continue
        match = _match_layer_norm(graph, node, consumers)
        # Only the normalised output may be a graph output: the LayerNormalization makes it.
        if match is None or any(out in graph_outputs for n in match["removed"]
                                if n is not match["last"] for out in n.output):
            continue
        prefix = f"layer_norm_fused_{len(replacements)}"
        graph.initializer.extend([
            numpy_helper.from_array(match["scale"], f"{prefix}_scale"),
            numpy_helper.from_array(match["bias"], f"{prefix}_bias")])
        # Put where the final Add was: every input is available there (x was read before).
        replacements[id(match["last"])] = [helper.make_node(
            "LayerNormalization", [match["x"], f"{prefix}_scale", f"{prefix}_bias"],
            [match["y"]], name=prefix, axis=-1, epsilon=match["epsilon"])]
        removed.update(id(n) for n in match["removed"])
    if not replacements:
        return 0
    _splice(graph, replacements, removed)
    return len(replacements)
