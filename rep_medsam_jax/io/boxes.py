"""Boxes and spacing: checked against the image they belong to.

Coordinates: x is the column (W axis), y the row (H axis), z the slice (D axis). In-plane
coordinates may run up to the image size (x <= W, y <= H); z is a slice index with a closed
range, so z <= D - 1. A box with min > max on any axis is rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rep_medsam_jax.io.errors import (BoxOutOfBoundsError, BoxShapeError, InvertedBoxError,
                                      MissingBoxesError, SpacingError)


def validate_boxes(boxes: Any, spatial_shape: Sequence[int], where: str,
                   clip_depth: bool = False) -> np.ndarray:
    """Check boxes against an image of ``spatial_shape`` ((H, W) or (D, H, W)).

    Returns the boxes as a numeric (N, 4) / (N, 6) array (dtype kept: int or float). Raises
    MissingBoxesError (N == 0), BoxShapeError, BoxOutOfBoundsError, InvertedBoxError.

    ``clip_depth`` (challenge npz files): a 3D box whose z_max runs past the last slice is
    clipped to D - 1 instead of rejected, as the per-box loop of
    ``CVPR24_LiteMedSAM_infer.py`` does (its embedding loop crashes on such boxes). A box
    starting past the volume is still an error.
    """
    is_3d = len(spatial_shape) == 3
    width = 6 if is_3d else 4
    try:
        array = np.asarray(boxes)
    except (ValueError, TypeError) as err:     # ragged lists
        raise BoxShapeError(f"{where}: boxes are not a rectangular array: {err}") from None
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                       or np.issubdtype(array.dtype, np.floating)):
        raise BoxShapeError(f"{where}: boxes must be numbers, got dtype {array.dtype}")
    if array.size == 0:
        raise MissingBoxesError(f"{where}: the box list is empty; give at least one box")
    if array.ndim != 2 or array.shape[1] != width:
        layout = ("[x_min, y_min, z_min, x_max, y_max, z_max]" if is_3d
                  else "[x_min, y_min, x_max, y_max]")
        raise BoxShapeError(f"{where}: boxes must have shape (N, {width}) {layout} for a "
                            f"{'3D' if is_3d else '2D'} case, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise BoxShapeError(f"{where}: boxes contain NaN or infinite values")
    if is_3d and clip_depth and np.any(array[:, 5] > spatial_shape[0] - 1):
        array = array.copy()
        array[:, 5] = np.maximum(np.minimum(array[:, 5], spatial_shape[0] - 1), array[:, 2])
    if is_3d:
        depth, height, width_px = spatial_shape
        lows, highs = array[:, :3], array[:, 3:]
        # x, y are pixel edges (may reach W / H); z is a closed slice range (at most D - 1).
        limits = np.array([width_px, height, depth - 1])
        axes = "xyz"
    else:
        height, width_px = spatial_shape
        lows, highs = array[:, :2], array[:, 2:]
        limits = np.array([width_px, height])
        axes = "xy"
    size = "x".join(str(s) for s in spatial_shape)
    for index in range(len(array)):
        box = array[index].tolist()
        for axis, name in enumerate(axes):
            if lows[index, axis] > highs[index, axis]:
                raise InvertedBoxError(
                    f"{where}: box {index + 1} {box} has {name}_min > {name}_max")
        if np.any(lows[index] < 0) or np.any(highs[index] > limits):
            limit_text = ", ".join(f"{n} <= {int(v)}" for n, v in zip(axes, limits))
            raise BoxOutOfBoundsError(
                f"{where}: box {index + 1} {box} lies outside the image of shape {size} "
                f"(need 0 <= coordinates and {limit_text})")
    return array


def _validate_spacing(spacing: Any, where: str) -> np.ndarray:
    array = np.asarray(spacing)
    if (array.shape != (3,) or not np.issubdtype(array.dtype, np.number)
            or not np.all(np.isfinite(array))):
        raise SpacingError(f"{where}: spacing must be 3 finite numbers, got {spacing!r}")
    return array


def validate_spacing(spacing: Any, where: str) -> np.ndarray:
    array = np.asarray(spacing)
    if (array.shape != (3,) or not np.issubdtype(array.dtype, np.number)
            or not np.all(np.isfinite(array))):
        raise SpacingError(f"{where}: spacing must be 3 finite numbers, got {spacing!r}")
    return array
