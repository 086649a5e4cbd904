"""The teacher's 1024 input of a stored slice, three ways that agree with ``teacher_input``.

The reference (``rep_medsam_jax.preprocess.teacher_input(region, T, keep_aspect=True)``) is a
scikit-image order-3 resize of the (h, w, 3) uint8 region to (H', W') = longest side T, then
min-max to [0, 1] and zero padding to T x T. Three ways to compute it:

* ``reference``: that function, on the CPU (seconds per 1024 slice on one core);
* ``grey``: a slice whose three channels are equal (every CT / MR / 3D slice) is resized once as
  one channel and repeated; other slices take the reference. Same numbers to ~1e-13 (the spline
  along a length-3 channel axis at zoom 1 returns the input up to rounding);
* ``device``: the resize is linear and separable: before scikit-image's final clip,
  resize(X) = A_h @ X @ A_w^T per channel with A (H', h) the resize of an identity matrix
  (``interpolation_matrix``). The host only looks the two matrices up (cached per length) and
  sends the uint8 slice; the matmuls, the clip to the input's range (scikit-image's
  ``clip=True``, which widens the range to include 0 when the zero padding of ``mode='constant'``
  brought the output across 0), the min-max and the padding run on the accelerator inside the
  teacher's jitted function (``device_teacher_inputs``), in float32 at HIGHEST precision.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from rep_medsam_jax.preprocess import (MINMAX_EPS, longest_side_size, normalize_minmax,
                                       pad_to_square, teacher_input)

TEACHER_INPUT_MODES = ("device", "grey", "reference")


def _skimage_resize(image: np.ndarray, shape: tuple[int, ...], clip: bool = True) -> np.ndarray:
    from skimage import transform  # noqa: PLC0415  (training-only dependency)

    # The arguments of preprocess.teacher_input's resize.
    return transform.resize(image, shape, order=3, mode="constant", preserve_range=True,
                            anti_aliasing=True, clip=clip)


def is_grey(region: np.ndarray) -> bool:
    """(h, w) or (h, w, 3): True when all channels are equal."""
    return region.ndim == 2 or bool((region[..., :1] == region).all())


def grey_teacher_input(region: np.ndarray, size: int) -> np.ndarray:
    """``teacher_input(region, size, keep_aspect=True)`` with one resize for a grey region.

    region: (h, w, 3) or (h, w) uint8 -> (size, size, 3) float32.
    """
    if not is_grey(region):
        return teacher_input(region, size=size, keep_aspect=True)
    channel = region if region.ndim == 2 else region[..., 0]
    resized = _skimage_resize(channel, longest_side_size(channel.shape, size))
    grey = pad_to_square(normalize_minmax(resized), size)
    return np.repeat(grey[:, :, None], 3, axis=-1)


@functools.lru_cache(maxsize=1024)
def interpolation_matrix(in_length: int, out_length: int) -> np.ndarray:
    """(out_length, in_length) float64 A with resize(x) = A @ x along one axis, before the clip.

    Column j is the (unclipped) scikit-image resize of unit vector e_j: the resize of the
    identity along axis 0 (axis 1 keeps its length: zoom 1 returns it to ~1e-15). Read-only.
    """
    matrix = _skimage_resize(np.eye(in_length), (out_length, in_length), clip=False)
    matrix.setflags(write=False)
    return matrix


def _padded_matrix(in_length: int, out_length: int, size: int, frame: int) -> np.ndarray:
    """(size, frame) float32: interpolation_matrix in the top-left corner, zeros elsewhere."""
    padded = np.zeros((size, frame), np.float32)
    padded[:out_length, :in_length] = interpolation_matrix(in_length, out_length)
    return padded


def prepare_batch(images: list[np.ndarray], image_hws: list[np.ndarray], mode: str,
                  size: int) -> dict[str, np.ndarray]:
    """The host's part for n stored slices (image (S, S, 3) uint8, valid image_hw (2,)).

    reference / grey: {"inputs": (n, size, size, 3) float32}.
    device: {"images": (n, S, S, 3) uint8, "row_matrix", "col_matrix": (n, size, S) float32,
    "in_hw", "out_hw": (n, 2) int32}, for ``device_teacher_inputs``.
    """
    if mode not in TEACHER_INPUT_MODES:
        raise ValueError(f"teacher input mode must be one of {TEACHER_INPUT_MODES}, got {mode!r}")
    regions_hw = [(int(hw[0]), int(hw[1])) for hw in image_hws]
    if mode != "device":
        make = grey_teacher_input if mode == "grey" else (
            lambda region, size: teacher_input(region, size=size, keep_aspect=True))
        inputs = [make(image[:h, :w], size) for image, (h, w) in zip(images, regions_hw)]
        return {"inputs": np.stack(inputs).astype(np.float32)}
    frame = images[0].shape[0]
    out_hws = [longest_side_size(hw, size) for hw in regions_hw]
    return {
        "images": np.stack(images).astype(np.uint8),
        "row_matrix": np.stack([_padded_matrix(h, oh, size, frame)
                                for (h, _), (oh, _) in zip(regions_hw, out_hws)]),
        "col_matrix": np.stack([_padded_matrix(w, ow, size, frame)
                                for (_, w), (_, ow) in zip(regions_hw, out_hws)]),
        "in_hw": np.asarray(regions_hw, np.int32),
        "out_hw": np.asarray(out_hws, np.int32),
    }


def _valid(hw: Any, length: int) -> Any:
    """(n, 2) sizes -> (n, length, length, 1) bool mask of the top-left (h, w) block."""
    import jax.numpy as jnp  # noqa: PLC0415

    positions = jnp.arange(length)
    rows = positions[None, :] < hw[:, :1]
    cols = positions[None, :] < hw[:, 1:]
    return (rows[:, :, None] & cols[:, None, :])[..., None]


def device_teacher_inputs(batch: dict[str, Any]) -> Any:
    """jnp: ``prepare_batch(..., "device")`` arrays -> (n, T, T, 3) float32 teacher inputs,
    equal to ``teacher_input(region, T, keep_aspect=True)`` up to float32 rounding."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    images = batch["images"].astype(jnp.float32)
    frame, size = images.shape[1], batch["row_matrix"].shape[1]
    resized = jnp.einsum("bts,bsrc,bur->btuc", batch["row_matrix"], images,
                         batch["col_matrix"], precision=jax.lax.Precision.HIGHEST)
    in_valid, out_valid = _valid(batch["in_hw"], frame), _valid(batch["out_hw"], size)

    def extreme(values, valid, reduce, fill):
        return reduce(jnp.where(valid, values, fill), axis=(1, 2, 3), keepdims=True)

    low_in = extreme(images, in_valid, jnp.min, jnp.inf)
    high_in = extreme(images, in_valid, jnp.max, -jnp.inf)
    low_out = extreme(resized, out_valid, jnp.min, jnp.inf)
    high_out = extreme(resized, out_valid, jnp.max, -jnp.inf)
    # scikit-image's clip: the input's range, widened to include cval = 0 when 0 is outside it
    # but inside the output's range.
    widen = ~((low_in <= 0) & (0 <= high_in)) & (low_out <= 0) & (0 <= high_out)
    low = jnp.where(widen, jnp.minimum(low_in, 0.0), low_in)
    high = jnp.where(widen, jnp.maximum(high_in, 0.0), high_in)
    clipped = jnp.clip(resized, low, high)
    low = extreme(clipped, out_valid, jnp.min, jnp.inf)
    span = jnp.maximum(extreme(clipped, out_valid, jnp.max, -jnp.inf) - low, MINMAX_EPS)
    return jnp.where(out_valid, (clipped - low) / span, 0.0)
