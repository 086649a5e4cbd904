"""The composed model: shapes, parameter counts, many boxes on one embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rep_medsam_jax.models.config import MODEL_PRESETS
from rep_medsam_jax.models.medsam_lite import MedSAMLite, build_model, init_variables


def _count(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree))


def test_full_model_parameter_counts_match_the_reference():
    config = MODEL_PRESETS["rep_medsam"]
    shapes = jax.eval_shape(build_model(config).init, jax.random.key(0),
                            jnp.zeros((1, 256, 256, 3)), jnp.zeros((1, 4)))
    params = shapes["params"]
    # PyTorch keeps the Gaussian PE matrix (2, 128) as a buffer, not a parameter; we keep it in
    # params (it must travel with the weights) and never train it.
    buffer = _count(params["prompt_encoder"]["pe_layer"])
    assert buffer == 256
    assert _count(params["image_encoder"]) == 6_505_532
    assert _count(params["prompt_encoder"]) - buffer == 6_220
    assert _count(params["mask_decoder"]) == 4_058_340
    assert _count(params) - buffer == 10_570_092


def test_init_variables_has_the_model_tree_and_pytorch_style_bn_init():
    config = MODEL_PRESETS["rep_medsam_tiny"]
    model = build_model(config)
    variables = init_variables(config, 3)
    want = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)),
                          jnp.zeros((1, 4)))
    assert (jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), want)
            == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), variables))
    stats = variables["batch_stats"]["image_encoder"]
    variances = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(stats)
                 if p[-1].key == "var"]
    assert variances and all(np.all(v == 1) for v in variances)
    different = init_variables(config, 4)
    assert not np.array_equal(variables["params"]["mask_decoder"]["iou_token"],
                              different["params"]["mask_decoder"]["iou_token"])


def test_decode_many_boxes_on_one_embedding_equals_one_at_a_time():
    config = MODEL_PRESETS["rep_medsam_tiny"]
    model = build_model(config)
    variables = init_variables(config, 0)
    images = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)
    embedding, features = model.apply(variables, images, method=MedSAMLite.encode)
    assert embedding.shape == (1, 64, 64, 64)
    assert {"stem", "neck_in"} <= set(features)          # named intermediates
    boxes = np.array([[10, 10, 100, 120], [50, 60, 200, 250], [0, 0, 255, 255]], np.float32)
    logits, iou = model.apply(variables, embedding, boxes, method=MedSAMLite.decode)
    assert logits.shape == (3, 1, 256, 256) and iou.shape == (3, 1)
    for i in range(3):
        one, one_iou = model.apply(variables, embedding, boxes[i:i + 1],
                                   method=MedSAMLite.decode)
        np.testing.assert_allclose(one[0], logits[i], atol=2e-5)
        np.testing.assert_allclose(one_iou[0], iou[i], atol=2e-5)
