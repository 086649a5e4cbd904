"""Losses against hand-computed values and against PyTorch's BCE."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rep_medsam_jax import losses

# One 2 x 2 sample whose sigmoids are round numbers: p = [[0.5, 0.75], [0.25, 0.9]].
LOGITS = np.array([[[0.0, math.log(3.0)], [-math.log(3.0), math.log(9.0)]]], np.float32)
MASK = np.array([[[1, 1], [0, 0]]], np.uint8)

# Hand computation for that sample.
SUM_PG = 0.5 + 0.75
SUM_P2 = 0.25 + 0.5625 + 0.0625 + 0.81
SUM_G2 = 2.0
DICE = 1.0 - (2 * SUM_PG + 1e-5) / (SUM_P2 + SUM_G2 + 1e-5)
BCE = (math.log(2.0) + 2 * math.log(4.0 / 3.0) + math.log(10.0)) / 4
# logits > 0 at (0,1) and (1,1); the mask at (0,0) and (0,1): intersection 1, union 3.
IOU = 1.0 / 3.0


def test_dice_loss_matches_hand_value():
    assert float(losses.dice_loss(LOGITS, MASK)) == pytest.approx(DICE, rel=1e-6)


def test_dice_loss_is_a_batch_mean_of_per_sample_losses():
    # Second sample: all logits very negative (p ~ 0) on an empty mask: loss ~ 1 - 1e-5/1e-5 = 0.
    logits = np.concatenate([LOGITS, np.full_like(LOGITS, -30.0)])
    masks = np.concatenate([MASK, np.zeros_like(MASK)])
    per = losses.dice_loss_per_example(logits, masks)
    np.testing.assert_allclose(per, [DICE, 0.0], atol=1e-6)
    assert float(losses.dice_loss(logits, masks)) == pytest.approx(DICE / 2, rel=1e-5)
    # Weights: only the first sample counts.
    weighted = losses.dice_loss(logits, masks, jnp.array([1.0, 0.0]))
    assert float(weighted) == pytest.approx(DICE, rel=1e-6)


def test_bce_matches_hand_value_and_torch():
    assert float(losses.bce_with_logits(LOGITS, MASK)) == pytest.approx(BCE, rel=1e-6)
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 20, (3, 8, 8)).astype(np.float32)   # large: overflow-free form
    masks = (rng.random((3, 8, 8)) > 0.5).astype(np.float32)
    expected = torch.nn.BCEWithLogitsLoss()(torch.from_numpy(logits), torch.from_numpy(masks))
    assert float(losses.bce_with_logits(logits, masks)) == pytest.approx(float(expected),
                                                                         rel=1e-5)


def test_iou_target_and_loss_match_hand_values_without_gradient():
    np.testing.assert_allclose(losses.iou_targets(LOGITS, MASK), [IOU], rtol=1e-6)
    iou_pred = jnp.array([0.5])
    loss = losses.iou_loss_per_example(iou_pred, LOGITS, MASK)
    np.testing.assert_allclose(loss, [(0.5 - IOU) ** 2], rtol=1e-5)
    # The target carries no gradient: d loss / d logits = 0.
    grad = jax.grad(lambda x: losses.iou_loss_per_example(iou_pred, x, MASK).sum())(
        jnp.asarray(LOGITS))
    assert float(jnp.abs(grad).max()) == 0.0
    # Both empty: 1 (the reference would give 0/0).
    empty = losses.iou_targets(np.full_like(LOGITS, -1.0), np.zeros_like(MASK))
    np.testing.assert_allclose(empty, [1.0])


def test_seg_loss_squared_weighted_and_plain():
    iou_pred = jnp.array([0.5])
    iou_mse = (0.5 - IOU) ** 2
    total, parts = losses.seg_loss(LOGITS, iou_pred, MASK, losses.REFERENCE_SQUARED)
    assert float(total) == pytest.approx(DICE ** 2 + BCE ** 2 + iou_mse ** 2, rel=1e-5)
    assert float(parts["dice"]) == pytest.approx(DICE, rel=1e-6)
    assert float(parts["bce"]) == pytest.approx(BCE, rel=1e-6)
    assert float(parts["iou"]) == pytest.approx(iou_mse, rel=1e-5)
    total, _ = losses.seg_loss(LOGITS, iou_pred, MASK, losses.FIRST_COMMIT_WEIGHTED)
    assert float(total) == pytest.approx(1.15 * DICE + BCE + 0.85 * iou_mse, rel=1e-5)
    total, _ = losses.seg_loss(LOGITS, iou_pred, MASK, losses.PLAIN_SUM)
    assert float(total) == pytest.approx(DICE + BCE + iou_mse, rel=1e-5)


def test_distill_mse_and_dice_score():
    student = np.ones((2, 2, 2, 3), np.float32)
    teacher = np.zeros((2, 2, 2, 3), np.float32)
    teacher[0, 0, 0, 0] = 3.0              # (1 - 3)^2 = 4 instead of 1 at one of 24 elements
    assert float(losses.distill_mse(student, teacher)) == pytest.approx((23 + 4) / 24)
    with pytest.raises(ValueError, match="differ in shape"):
        losses.distill_mse(student, teacher[:, :1])
    # DSC: prediction {(0,1), (1,1)}, mask {(0,0), (0,1)}: 2 * 1 / (2 + 2).
    np.testing.assert_allclose(losses.dice_score_per_example(LOGITS, MASK), [0.5])
