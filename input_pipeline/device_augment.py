"""The device's half of the input pipeline: uint8 images in, student images out, in JAX.

The loader (``make_loader(..., device_images=True)``) sends each stored image as (S, S, 3)
uint8 (a quarter of the float32 bytes) with ``image_region`` [y0, x0, y1, x1), where its valid
pixels lie after the flips, and, with colour jitter, the jitter drawn on the host
(``augment.draw_jitter``). :func:`finish_images` then does on the device what the host would
have done, with the same maths as ``examples.student_image`` and ``augment.apply_jitter``:

1. min-max normalisation over the valid region, (x - min) / max(max - min, 1e-8), zero outside
   (the padding);
2. torchvision's ColorJitter: brightness, contrast, saturation and hue in the drawn order (the
   colour-space conversions are augment.py's own, run with ``jax.numpy``).

Batched: images (B, S, S, 3), region (B, 4), order (B, 4), factors (B, 4). Each example's
order is applied with a select over the four adjustments, so the program is one for all orders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from input_pipeline.augment import hsv_to_rgb, rgb_to_hsv
from rep_medsam_jax.preprocess import MINMAX_EPS

# torchvision's rgb_to_grayscale weights, as in augment.py (written out as a weighted sum so
# that no accelerator computes it as a reduced-precision matrix product).
GREY_WEIGHTS = (0.2989, 0.587, 0.114)


def region_mask(region: jax.Array, size: int) -> jax.Array:
    """(B, 4) [y0, x0, y1, x1) -> (B, S, S, 1) bool, True inside the region."""
    coords = jnp.arange(size)
    rows = (coords[None, :] >= region[:, 0:1]) & (coords[None, :] < region[:, 2:3])
    cols = (coords[None, :] >= region[:, 1:2]) & (coords[None, :] < region[:, 3:4])
    return (rows[:, :, None] & cols[:, None, :])[..., None]


def normalize_images(images: jax.Array, region: jax.Array) -> jax.Array:
    """(B, S, S, 3) uint8 -> float32 in [0, 1]: per image, min-max over the valid region (all
    three channels), zero elsewhere."""
    values = images.astype(jnp.float32)
    inside = region_mask(region, images.shape[1])
    low = jnp.min(jnp.where(inside, values, jnp.inf), axis=(1, 2, 3), keepdims=True)
    high = jnp.max(jnp.where(inside, values, -jnp.inf), axis=(1, 2, 3), keepdims=True)
    span = jnp.maximum(high - low, MINMAX_EPS)
    return jnp.where(inside, (values - low) / span, 0.0)


def grey(image: jax.Array) -> jax.Array:
    """(..., 3) -> (..., 1) with torchvision's weights."""
    red, green, blue = GREY_WEIGHTS
    return (red * image[..., 0] + green * image[..., 1] + blue * image[..., 2])[..., None]


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjustments(image: jax.Array, factors: jax.Array) -> jax.Array:
    """One (S, S, 3) image -> (4, S, S, 3): it after brightness, contrast, saturation, hue."""
    grey_image = grey(image)
    hsv = rgb_to_hsv(image, xp=jnp)
    hsv = hsv.at[..., 0].set((hsv[..., 0] + factors[3]) % 1)
    return jnp.stack([_blend(image, 0.0, factors[0]),
                      _blend(image, jnp.mean(grey_image), factors[1]),
                      _blend(image, grey_image, factors[2]),
                      jnp.clip(hsv_to_rgb(hsv, xp=jnp), 0, 1)])


def jitter_images(images: jax.Array, order: jax.Array, factors: jax.Array) -> jax.Array:
    """(B, S, S, 3) float32 in [0, 1] -> the same after each example's colour jitter."""
    def one(image, example_order, example_factors):
        for stage in range(4):
            image = adjustments(image, example_factors)[example_order[stage]]
        return image

    return jax.vmap(one)(images, order, factors.astype(jnp.float32))


def finish_images(batch: dict) -> jax.Array:
    """The batch's (B, S, S, 3) float32 student images: ``image`` as is when it is already
    float, else normalised over ``image_region`` (or divided by 255 without one), then
    jittered when the batch carries ``jitter_order`` / ``jitter_factors``."""
    images = batch["image"]
    if jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    elif "image_region" in batch:
        images = normalize_images(images, batch["image_region"])
    else:
        images = images.astype(jnp.float32) / 255.0
    if "jitter_order" in batch:
        images = jitter_images(images, batch["jitter_order"], batch["jitter_factors"])
    return images
