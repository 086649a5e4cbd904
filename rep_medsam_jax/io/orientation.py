"""NIfTI orientation: stored voxels <-> the (D, H, W) axial array the model sees, and boxes.

The voxel array is reoriented (flips and axis permutations only, never resampled) to the
closest LPS orientation (x -> patient Left, y -> Posterior, z -> Superior; the DICOM / ITK
patient convention) and stored as (D, H, W) = (z, y, x). A slice ``image[d]`` is then an axial
slice in radiological display (anterior at the top, the patient's right on the image's left),
exactly what SimpleITK's ``GetArrayFromImage`` gives for an identity-direction image, i.e. what
the challenge's npz files were made from. Writing applies the inverse, so a label map lies on
the input's voxel grid. nibabel's ``orientations`` module does the axis arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rep_medsam_jax.io.errors import ImageShapeError

LPS_AXCODES = ("L", "P", "S")


def orientation_to_lps(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform taking stored voxel axes to the closest LPS axes.

    A degenerate affine (no orientation information) keeps the stored axes as they are.
    """
    from nibabel import orientations  # noqa: PLC0415  (lazy: keeps start-up light)

    stored = orientations.io_orientation(affine)
    if np.any(np.isnan(stored)):
        stored = orientations.axcodes2ornt(LPS_AXCODES)
    return orientations.ornt_transform(stored, orientations.axcodes2ornt(LPS_AXCODES))


def three_axes(data: np.ndarray, where: str) -> np.ndarray:
    """A stored NIfTI array as (X, Y, Z): trailing singleton axes dropped, missing ones added
    (a 2D (X, Y) image is one slice); ImageShapeError when an extra axis is not singleton."""
    if data.ndim > 3 and any(n != 1 for n in data.shape[3:]):
        raise ImageShapeError(f"{where}: expected one 3D volume, got shape {tuple(data.shape)} "
                              "(time series / vector images are not supported)")
    return data.reshape(data.shape[:3] + (1,) * (3 - min(data.ndim, 3)))


def header_zooms(header: Any) -> np.ndarray:
    """(3,) voxel sizes of a NIfTI header's first three axes (1 for an axis it lacks)."""
    zooms = np.asarray(header.get_zooms()[:3], np.float64)
    return np.concatenate([zooms, np.ones(3 - zooms.size)])


def volume_to_dhw(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored NIfTI voxels (X, Y, Z) -> (D, H, W) = (z, y, x) in LPS orientation.

    Returns the reordered array and the orientation transform (for :func:`dhw_to_volume`).
    """
    from nibabel import orientations  # noqa: PLC0415

    transform = orientation_to_lps(affine)
    return orientations.apply_orientation(volume, transform).transpose(2, 1, 0), transform


def invert_orientation(transform: np.ndarray) -> np.ndarray:
    """The inverse of a nibabel orientation transform.

    ``transform[i] = (j, flip)`` sends input axis i to output axis j (reversed when flip is -1);
    the inverse sends axis j back to axis i with the same flip.
    """
    inverse = np.empty_like(transform)
    for axis, (target, flip) in enumerate(transform):
        inverse[int(target)] = (axis, flip)
    return inverse


def dhw_to_volume(array: np.ndarray, file_to_lps: np.ndarray) -> np.ndarray:
    """The inverse of :func:`volume_to_dhw`: (D, H, W) -> the stored voxel order (X, Y, Z)."""
    from nibabel import orientations  # noqa: PLC0415

    return orientations.apply_orientation(array.transpose(2, 1, 0),
                                          invert_orientation(file_to_lps))


def boxes_voxel_to_dhw(boxes: np.ndarray, file_shape: Sequence[int],
                       file_to_lps: np.ndarray) -> np.ndarray:
    """(N, 6) boxes in stored voxel indices (i, j, k, inclusive) -> the (D, H, W) array's
    [x_min, y_min, z_min, x_max, y_max, z_max] (x = W axis, y = H axis, z = D axis).

    Flipping an axis of n voxels maps index v to n - 1 - v and swaps min and max.
    """
    boxes = np.asarray(boxes)
    result = np.empty_like(boxes)
    for stored_axis in range(3):
        lps_axis, flip = int(file_to_lps[stored_axis, 0]), file_to_lps[stored_axis, 1] < 0
        low, high = boxes[:, stored_axis], boxes[:, stored_axis + 3]
        if flip:
            n = file_shape[stored_axis]
            low, high = (n - 1) - high, (n - 1) - low
        # LPS axis 0 is x (W), 1 is y (H), 2 is z (D): box columns x, y, z match LPS order.
        result[:, lps_axis], result[:, lps_axis + 3] = low, high
    return result
