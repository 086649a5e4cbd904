"""Training losses of Rep-MedSAM and LiteMedSAM: pure functions on arrays, float32 results.

Segmentation (Rep-MedSAM ``train_one_gpu.py``), for logits (B, H, W) and binary
masks (B, H, W):

* Dice: MONAI ``DiceLoss(sigmoid=True, squared_pred=True)``, per sample
  ``1 - (2 sum(p g) + 1e-5) / (sum(p^2) + sum(g^2) + 1e-5)`` with ``p = sigmoid(logits)``,
  averaged over the batch.
* BCE with logits, averaged over every pixel.
* IoU head: MSE between the predicted IoU and the true IoU of the thresholded prediction
  (``logits > 0``, i.e. ``sigmoid > 0.5``), the target carrying no gradient.

The reference sums the three terms *squared* (``Dice^2 + BCE^2 + IoU_MSE^2``); its first commit
used ``1.15 Dice + 1.0 BCE + 0.85 IoU_MSE`` and LiteMedSAM the plain sum. :class:`SegLossWeights`
covers all three (``squared=True`` with unit weights is the authors' shipped choice).

Distillation (the evident intent of ``train_one_gpu.py -distillation True``): mean squared
error over every element of the student and teacher embeddings.

Optional per-example weights (B,) let a padded evaluation batch ignore its padding: every
batch mean is then ``sum(w * per_example) / sum(w)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DICE_SMOOTH = 1e-5     # MONAI's smooth_nr = smooth_dr default


@dataclasses.dataclass(frozen=True)
class SegLossWeights:
    """total = sum_k weight_k * term_k (``squared=False``) or sum_k weight_k * term_k^2."""

    dice: float = 1.0
    bce: float = 1.0
    iou: float = 1.0
    squared: bool = True


# The authors' shipped loss, their first commit's, and LiteMedSAM's ``train_one_gpu.py``.
REFERENCE_SQUARED = SegLossWeights(1.0, 1.0, 1.0, squared=True)
FIRST_COMMIT_WEIGHTED = SegLossWeights(1.15, 1.0, 0.85, squared=False)
PLAIN_SUM = SegLossWeights(1.0, 1.0, 1.0, squared=False)


def _weighted_mean(per_example: jax.Array, weights: jax.Array | None) -> jax.Array:
    """(B,) -> scalar: the plain mean, or sum(w x) / sum(w) (0 when every weight is 0)."""
    if weights is None:
        return jnp.mean(per_example)
    weights = weights.astype(jnp.float32)
    return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1e-12)


def dice_loss_per_example(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """(B, H, W) logits and {0, 1} masks -> (B,) MONAI squared-pred Dice loss."""
    probs = jax.nn.sigmoid(logits.astype(jnp.float32))
    target = masks.astype(jnp.float32)
    axes = tuple(range(1, logits.ndim))
    intersection = jnp.sum(probs * target, axis=axes)
    denominator = jnp.sum(probs * probs, axis=axes) + jnp.sum(target * target, axis=axes)
    return 1.0 - (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)


def dice_loss(logits: jax.Array, masks: jax.Array,
              weights: jax.Array | None = None) -> jax.Array:
    """(B, H, W) logits and masks -> scalar, the batch mean of :func:`dice_loss_per_example`."""
    return _weighted_mean(dice_loss_per_example(logits, masks), weights)


def bce_with_logits_per_example(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """(B, H, W) -> (B,) mean binary cross-entropy over each sample's pixels.

    Written in the overflow-free form ``max(x, 0) - x z + log(1 + exp(-|x|))`` (PyTorch's
    ``BCEWithLogitsLoss`` uses the same).
    """
    x = logits.astype(jnp.float32)
    z = masks.astype(jnp.float32)
    pixel = jnp.maximum(x, 0.0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.mean(pixel, axis=tuple(range(1, x.ndim)))


def bce_with_logits(logits: jax.Array, masks: jax.Array,
                    weights: jax.Array | None = None) -> jax.Array:
    """(B, H, W) -> scalar mean over every pixel of the batch (samples have equal size)."""
    return _weighted_mean(bce_with_logits_per_example(logits, masks), weights)


def iou_targets(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """(B, H, W) -> (B,) IoU of ``logits > 0`` with the mask, without gradient.

    The reference divides counts with no epsilon, so an empty prediction of an empty mask is
    0 / 0 = NaN there; here that case is 1 (the prediction is exactly right). The reference
    never hits it (it always picks a label present in the slice).
    """
    logits = jax.lax.stop_gradient(logits)
    predicted = logits > 0
    target = masks > 0
    axes = tuple(range(1, logits.ndim))
    intersection = jnp.sum(predicted & target, axis=axes).astype(jnp.float32)
    union = jnp.sum(predicted | target, axis=axes).astype(jnp.float32)
    return jnp.where(union > 0, intersection / jnp.maximum(union, 1.0), 1.0)


def iou_loss_per_example(iou_pred: jax.Array, logits: jax.Array, masks: jax.Array) -> jax.Array:
    """(B,) predicted IoU (the raw head output, no sigmoid) -> (B,) squared error to the truth."""
    return jnp.square(iou_pred.astype(jnp.float32) - iou_targets(logits, masks))


def seg_loss(logits: jax.Array, iou_pred: jax.Array, masks: jax.Array,
             weights: SegLossWeights = REFERENCE_SQUARED,
             example_weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The pipeline loss. logits (B, H, W), iou_pred (B,), masks (B, H, W) {0, 1}.

    Returns (total, {"dice", "bce", "iou", "loss"}), all scalars. Each term is a batch mean
    first and squared afterwards when ``weights.squared`` (the reference squares the means).
    """
    dice = dice_loss(logits, masks, example_weights)
    bce = bce_with_logits(logits, masks, example_weights)
    iou = _weighted_mean(iou_loss_per_example(iou_pred, logits, masks), example_weights)
    terms = (dice, bce, iou)
    if weights.squared:
        terms = tuple(jnp.square(t) for t in terms)
    total = weights.dice * terms[0] + weights.bce * terms[1] + weights.iou * terms[2]
    return total, {"dice": dice, "bce": bce, "iou": iou, "loss": total}


def distill_mse_per_example(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """(B, h, w, C) embeddings -> (B,) mean squared difference per sample (float32)."""
    diff = student.astype(jnp.float32) - teacher.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def distill_mse(student: jax.Array, teacher: jax.Array,
                example_weights: jax.Array | None = None) -> jax.Array:
    """(B, h, w, C) -> scalar MSE over every element (``nn.MSELoss()``; samples equal size)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student embedding {student.shape} and teacher embedding "
                         f"{teacher.shape} differ in shape")
    return _weighted_mean(distill_mse_per_example(student, teacher), example_weights)


def dice_score_per_example(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """(B, H, W) -> (B,) DSC 2|G n S| / (|G| + |S|) of ``logits > 0`` (1 when both empty)."""
    predicted = logits > 0
    target = masks > 0
    axes = tuple(range(1, logits.ndim))
    intersection = jnp.sum(predicted & target, axis=axes).astype(jnp.float32)
    total = (jnp.sum(predicted, axis=axes) + jnp.sum(target, axis=axes)).astype(jnp.float32)
    return jnp.where(total > 0, 2.0 * intersection / jnp.maximum(total, 1.0), 1.0)
