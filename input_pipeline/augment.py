"""Training augmentation (the recipe of the Rep-MedSAM authors' ``train_one_gpu.py``): pure
NumPy functions on one example dict.

An example holds (S = the square input size, 256):

* ``image``: (S, S, 3) float32 in [0, 1] (already normalised, see ``examples.student_image``),
  or, when the device finishes the image (``input_pipeline.device_augment``), the stored
  (S, S, 3) uint8 with ``image_region`` (4,) int32 [y0, x0, y1, x1): where its valid
  (unpadded) pixels lie, which the flips move;
* ``mask``: (S, S) uint8 {0, 1}, one object;
* ``box``: (4,) int32 [x_min, y_min, x_max, y_max], inclusive pixel indices in the S frame;
* optionally ``teacher_embedding``: (g, g, C) (64 x 64 x 256 for MedSAM ViT-B), the teacher's
  embedding of the same (unflipped) slice, whose grid covers the same S x S frame.

Geometry: a flip maps pixel index x to S - 1 - x, so a box [x0, y0, x1, y1] becomes
[S - 1 - x1, y0, S - 1 - x0, y1], and the embedding grid is flipped along the same axis (cell j of
g covers pixels [j S/g, (j + 1) S/g), which a flip sends to cell g - 1 - j). For the image and the
mask this is exact. For the teacher embedding it is an approximation: the ViT is not
flip-equivariant (position embeddings, relative positions and the bottom/right window padding are
not symmetric), so the flipped embedding of a slice is not the embedding of the flipped slice.
The exact alternative is to run the teacher online on the identically flipped 1024 input (see
docs/input_pipeline.md for its cost).

The reference (Rep-MedSAM ``train_one_gpu.py``) applies ColorJitter, then a horizontal and a
vertical flip each with probability 0.7, then takes the box of the (flipped) mask and widens each
side by a random 0..5 pixels, clipping to [0, 256]. Here the upper clip is S - 1 = 255 (the last
pixel; 256 is one past the image): a deliberate fix.

Colour jitter on the device: :func:`draw_jitter` draws the order and factors exactly as
:func:`color_jitter` does (same generator calls), and the example carries them
(``jitter_order`` (4,) int32, ``jitter_factors`` (4,) float32) to the device, which applies
them after normalising. Jitter and flips commute (every adjustment is per pixel except the
contrast's mean, which a flip does not change), so the result is the host recipe's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma, as torchvision rounds them).
_GREY_WEIGHTS = np.array([0.2989, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run and how strongly.

    flip_probability: chance of each of the horizontal and vertical flips (reference 0.7).
    color_jitter: torchvision ColorJitter(brightness, contrast, saturation, hue) with the
        factors below, in a random order (reference: on).
    box_shift: each box side moves outward by a random 0..box_shift pixels (inclusive).
    """

    flip_probability: float = 0.7
    color_jitter: bool = True
    brightness: float = 0.4
    contrast: float = 0.5
    saturation: float = 0.4
    hue: float = 0.2
    box_shift: int = 5


# Fine-tuning the whole model: the reference's recipe.
FINETUNE_AUGMENT = AugmentConfig()
# Distilling the encoder from stored teacher embeddings: flips (an approximation, see above) but
# no colour jitter, since the stored target was computed on the unjittered image; the box is
# unused by the embedding loss.
DISTILL_AUGMENT = AugmentConfig(flip_probability=0.5, color_jitter=False, box_shift=0)
NO_AUGMENT = AugmentConfig(flip_probability=0.0, color_jitter=False, box_shift=0)


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------

def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) mask -> (4,) int32 [x_min, y_min, x_max, y_max] of its non-zero pixels (inclusive).

    Raises ValueError for an empty mask.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("an empty mask has no box")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.int32)


def perturb_box(box: np.ndarray, rng: np.random.Generator, max_shift: int,
                size: int) -> np.ndarray:
    """Move each side of (4,) [x0, y0, x1, y1] outward by an independent U{0..max_shift} and clip
    to [0, size - 1]. Returns int32. The box only grows, so it still contains its object."""
    shifts = rng.integers(0, max_shift + 1, size=4)
    moved = np.asarray(box, np.int64) + shifts * np.array([-1, -1, 1, 1])
    return np.clip(moved, 0, size - 1).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Flips
# --------------------------------------------------------------------------------------------

def flip_horizontal(example: dict[str, Any]) -> dict[str, Any]:
    """Mirror left-right: image, mask and teacher embedding along W; box x coordinates (and the
    image region's)."""
    flipped = dict(example)
    width = example["image"].shape[1]
    for key in ("image", "mask", "teacher_embedding"):
        if key in example:
            flipped[key] = np.ascontiguousarray(example[key][:, ::-1])
    if "image_region" in example:
        y0, x0, y1, x1 = np.asarray(example["image_region"])
        flipped["image_region"] = np.array([y0, width - x1, y1, width - x0], np.int32)
    if "box" in example:
        x0, y0, x1, y1 = np.asarray(example["box"])
        flipped["box"] = np.array([width - 1 - x1, y0, width - 1 - x0, y1],
                                  dtype=np.asarray(example["box"]).dtype)
    return flipped


def flip_vertical(example: dict[str, Any]) -> dict[str, Any]:
    """Mirror top-bottom: image, mask and teacher embedding along H; box y coordinates (and the
    image region's)."""
    flipped = dict(example)
    height = example["image"].shape[0]
    for key in ("image", "mask", "teacher_embedding"):
        if key in example:
            flipped[key] = np.ascontiguousarray(example[key][::-1])
    if "image_region" in example:
        y0, x0, y1, x1 = np.asarray(example["image_region"])
        flipped["image_region"] = np.array([height - y1, x0, height - y0, x1], np.int32)
    if "box" in example:
        x0, y0, x1, y1 = np.asarray(example["box"])
        flipped["box"] = np.array([x0, height - 1 - y1, x1, height - 1 - y0],
                                  dtype=np.asarray(example["box"]).dtype)
    return flipped


# --------------------------------------------------------------------------------------------
# Colour jitter (torchvision.transforms.v2 semantics on float images in [0, 1])
# --------------------------------------------------------------------------------------------

def rgb_to_grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W, 1), torchvision's weights."""
    return (image @ _GREY_WEIGHTS)[..., None].astype(np.float32)


def _blend(image: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
    return np.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0).astype(np.float32)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """x * factor, clipped to [0, 1]."""
    return _blend(image, 0.0, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean of the grey image (one scalar per image), clipped to [0, 1]."""
    return _blend(image, float(rgb_to_grey(image).mean()), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey image, clipped to [0, 1]."""
    return _blend(image, rgb_to_grey(image), factor)


def rgb_to_hsv(image: np.ndarray, xp: Any = np) -> np.ndarray:
    """(..., 3) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn; grey: h = s = 0).
    ``xp``: the array module (NumPy here, ``jax.numpy`` on the device)."""
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    value = image.max(axis=-1)
    chroma = value - image.min(axis=-1)
    safe_chroma = xp.where(chroma > 0, chroma, 1)
    saturation = xp.where(value > 0, chroma / xp.where(value > 0, value, 1), 0)
    # Hue sector by which channel is the maximum (red first, then green, as colorsys does).
    hue = xp.where(value == red, (green - blue) / safe_chroma,
                   xp.where(value == green, 2 + (blue - red) / safe_chroma,
                            4 + (red - green) / safe_chroma))
    hue = xp.where(chroma > 0, (hue / 6) % 1, 0)
    return xp.stack([hue, saturation, value], axis=-1).astype(image.dtype)


def hsv_to_rgb(hsv: np.ndarray, xp: Any = np) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`: channel n in (R, G, B) = v - v s clip(min(k, 4 - k), 0, 1)
    with k = (n' + 6 h) mod 6, n' = 5, 3, 1 (the piecewise-linear HSV hexcone, unrolled)."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    channels = []
    for offset in (5, 3, 1):
        k = (offset + hue * 6) % 6
        channels.append(value - value * saturation * xp.clip(xp.minimum(k, 4 - k), 0, 1))
    return xp.stack(channels, axis=-1)


def is_grey(image: np.ndarray) -> bool:
    """True when the three channels are equal (grey slices repeated to RGB)."""
    return bool(np.array_equal(image[..., 0], image[..., 1])
                and np.array_equal(image[..., 1], image[..., 2]))


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue by ``shift`` turns (|shift| <= 0.5); grey pixels are unchanged, so a grey
    image is returned as is (most medical images: skips the colour-space round trip)."""
    if is_grey(image):
        return image
    hsv = rgb_to_hsv(image.astype(np.float32))
    hsv[..., 0] = (hsv[..., 0] + np.float32(shift)) % 1
    return np.clip(hsv_to_rgb(hsv), 0, 1).astype(np.float32)


def draw_jitter(rng: np.random.Generator, config: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """torchvision v2 ColorJitter's random part: (order (4,) int32, a permutation of
    (brightness, contrast, saturation, hue); factors (4,) float32 in that fixed order: brightness
    from [1 - b, 1 + b] (floored at 0), likewise contrast and saturation; hue shift from
    [-h, h])."""
    order = rng.permutation(4)
    factors = (rng.uniform(max(0.0, 1 - config.brightness), 1 + config.brightness),
               rng.uniform(max(0.0, 1 - config.contrast), 1 + config.contrast),
               rng.uniform(max(0.0, 1 - config.saturation), 1 + config.saturation),
               rng.uniform(-config.hue, config.hue))
    return order.astype(np.int32), np.asarray(factors, np.float32)


def apply_jitter(image: np.ndarray, order: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """The four adjustments in ``order`` with ``factors`` (see :func:`draw_jitter`)."""
    adjust = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for index in order:
        image = adjust[index](image, float(factors[index]))
    return image


def color_jitter(image: np.ndarray, rng: np.random.Generator,
                 config: AugmentConfig) -> np.ndarray:
    """torchvision v2 ColorJitter: the four adjustments in a random order, each with a factor
    drawn uniformly (:func:`draw_jitter`)."""
    return apply_jitter(image, *draw_jitter(rng, config))


# --------------------------------------------------------------------------------------------
# The whole recipe
# --------------------------------------------------------------------------------------------

def augment_example(example: dict[str, Any], rng: np.random.Generator,
                    config: AugmentConfig, jitter_on_device: bool = False) -> dict[str, Any]:
    """Colour jitter, flips, then the box from the (flipped) mask, widened (the reference order).

    Draws from ``rng`` in a fixed order, so an example's augmentation is a function of the seed.
    jitter_on_device: draw the jitter but only record it (``jitter_order``, ``jitter_factors``)
    for the device to apply. Returns a new dict; the input is not modified.
    """
    example = dict(example)
    if config.color_jitter:
        order, factors = draw_jitter(rng, config)
        if jitter_on_device:
            example["jitter_order"], example["jitter_factors"] = order, factors
        else:
            example["image"] = apply_jitter(example["image"], order, factors)
    if rng.random() < config.flip_probability:
        example = flip_horizontal(example)
    if rng.random() < config.flip_probability:
        example = flip_vertical(example)
    box = box_from_mask(example["mask"])
    if config.box_shift > 0:
        box = perturb_box(box, rng, config.box_shift, example["mask"].shape[0])
    example["box"] = box
    return example
