"""Intensity rules: every image reaches the model as uint8, by one rule per source.

* Challenge npz images are uint8 already; other integer / whole-valued float arrays within
  0..255 are cast, anything else is an error (:func:`to_uint8`): converting silently would
  change the intensities the model sees.
* 2D images are (H, W, 3) RGB: grey repeated, alpha dropped (:func:`as_rgb`).
* Volumes (NIfTI, DICOM series) follow ``pre_CT_MR.py`` of the MedSAM repository
  (:func:`intensities_to_uint8`): modality ``"CT"``: clip to [level - width/2, level + width/2]
  (default level 40, width 400 HU), then min-max the clipped volume to 0..255; otherwise clip to
  the 0.5th / 99.5th percentiles of the voxels > 0 (of all voxels if none is > 0), min-max to
  0..255, and set voxels that were exactly 0 back to 0. Truncated to uint8; a constant volume
  becomes all zeros.
"""

from __future__ import annotations

import numpy as np

from rep_medsam_jax.io.errors import ImageDtypeError, ImageShapeError, NonFiniteImageError
from rep_medsam_jax.preprocess import (DEFAULT_CT_WINDOW, min_max_to_uint8,  # noqa: F401
                                       percentile_to_uint8, window_ct)

# Air is -1000 HU; other modalities are rarely this negative. Below it, a volume read without
# a modality gets a note suggesting CT windowing (never a silent change of rule).
LOOKS_LIKE_HU = -900.0


def to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """uint8 as is; booleans, integers and whole-valued floats within 0..255 converted.

    NaN / infinity raise NonFiniteImageError; fractions, values outside 0..255 and non-numeric
    dtypes raise ImageDtypeError.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ImageDtypeError(f"{where}: image dtype {array.dtype} is not numeric; expected "
                              "uint8 0..255")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise NonFiniteImageError(f"{where}: image has {bad} NaN or infinite pixel(s)")
        if not np.all(array == np.round(array)):
            raise ImageDtypeError(
                f"{where}: image dtype {array.dtype} has non-integer values; expected uint8 "
                "0..255 (convert the intensities to uint8 first)")
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise ImageDtypeError(
            f"{where}: image dtype {array.dtype} has values in [{low}, {high}], outside uint8 "
            "0..255; convert the intensities to uint8 first")
    return array.astype(np.uint8)


def as_rgb(image: np.ndarray, where: str) -> np.ndarray:
    """(H, W) / (H, W, 1) / (H, W, 3) / (H, W, 4) -> (H, W, 3): grey repeated, alpha dropped."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        hint = ("; a volume must be in a file whose name starts with '3D'"
                if image.ndim == 3 else "")
        raise ImageShapeError(
            f"{where}: a 2D image must be (H, W), (H, W, 3) or (H, W, 4), got {image.shape}{hint}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def intensities_to_uint8(volume: np.ndarray, modality: str | None = None,
                         ct_window: tuple[float, float] | None = None) -> np.ndarray:
    """The volume rule: CT windowing when ``modality`` is "CT" (any case), else percentile
    clipping (see the module docstring). Same shape in and out."""
    if modality is not None and modality.upper() == "CT":
        level, width = ct_window or DEFAULT_CT_WINDOW
        return window_ct(volume, level, width)
    return percentile_to_uint8(volume)


def check_finite(volume: np.ndarray, where: str) -> None:
    """NonFiniteImageError when a float volume holds NaN or infinity."""
    if np.issubdtype(volume.dtype, np.floating) and not np.all(np.isfinite(volume)):
        bad = int(np.count_nonzero(~np.isfinite(volume)))
        raise NonFiniteImageError(f"{where}: volume has {bad} NaN or infinite voxel(s)")


def hu_note(volume: np.ndarray, modality: str | None) -> tuple[str, ...]:
    """A note for the user when a volume without a modality looks like a CT in Hounsfield
    units (values down to -900 or below); the rule itself is not switched."""
    lowest = float(volume.min())
    if modality is None and lowest <= LOOKS_LIKE_HU:
        return (f"no modality given and values reach {lowest:g}, as a CT in Hounsfield units "
                "does: the percentile rule was used; for CT windowing set \"modality\": "
                "\"CT\" in the sidecar or pass --modality CT",)
    return ()
