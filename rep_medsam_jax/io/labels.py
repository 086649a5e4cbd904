"""Label maps: integer labels 0..65535 (0 = background, k = object k), held as uint8 when every
label is below 256, else uint16; and reading stored ground truths and predictions."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from rep_medsam_jax.io.errors import CaseReadError, LabelMapError
from rep_medsam_jax.io.formats import NIFTI_SUFFIXES, NPZ_SUFFIXES, is_3d_name, matching_suffix
from rep_medsam_jax.io.images import read_label_png
from rep_medsam_jax.io.nifti import load_nifti
from rep_medsam_jax.io.npz import read_npz, require
from rep_medsam_jax.io.orientation import header_zooms, three_axes

MAX_LABEL = 65535          # uint16: label maps are resized as uint16 (OpenCV nearest takes it)
LABEL_MAP_SUFFIXES = NPZ_SUFFIXES + NIFTI_SUFFIXES + (".png",)


def integer_labels(array: np.ndarray, where: str,
                   error: type[ValueError] = LabelMapError) -> np.ndarray:
    """Label map -> uint8 (max < 256) or uint16.

    Booleans become 0 / 1; whole-valued floats are accepted; anything else (NaN, fractions,
    negative labels, labels above 65535, non-numeric dtypes) raises ``error``.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise error(f"{where}: label map dtype {array.dtype} is not a number type")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise error(f"{where}: label map has NaN or non-integer values; labels must be "
                        "whole numbers (0 = background)")
    if array.size and (array.min() < 0 or array.max() > MAX_LABEL):
        raise error(f"{where}: labels range over [{array.min()}, {array.max()}]; expected "
                    f"0..{MAX_LABEL}")
    big = array.size and array.max() >= 256
    return array.astype(np.uint16 if big else np.uint8, copy=False)


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """A stored label map: labels (H, W) or (D, H, W), integer (uint8 / uint16); spacing per
    array axis for 3D (None for 2D); the affine of a NIfTI file (None otherwise)."""

    labels: np.ndarray
    spacing: np.ndarray | None
    is_3d: bool
    affine: np.ndarray | None = None


def read_label_map(path: str | os.PathLike, key: str = "gts") -> LabelMap:
    """A ground truth (``key="gts"``) or prediction (``"segs"``) of a supported file type.

    npz: the challenge's rules (3D by a ``3D`` name prefix; a 3D ground truth needs its
    ``spacing``, used as stored). NIfTI: 3D, spacing from the header's zooms on the stored axes.
    PNG: a 2D label map. Raises a CaseError (a ValueError) naming the file.
    """
    path = Path(path)
    suffix = matching_suffix(path)
    where = path.name
    if suffix in NPZ_SUFFIXES:
        is_3d = is_3d_name(path.name)
        arrays, keys = read_npz(path, (key, "spacing"))
        labels = require(arrays, keys, key, path, "the label map")
        spacing = arrays.get("spacing") if key == "gts" and is_3d else None
        if key == "gts" and is_3d and spacing is None:
            raise LabelMapError(f"{where}: 3D ground truth has no 'spacing'")
        return LabelMap(integer_labels(labels, where), spacing, is_3d)
    if suffix in NIFTI_SUFFIXES:
        nifti = load_nifti(path)
        data = three_axes(nifti.data, where)
        return LabelMap(integer_labels(data, where), header_zooms(nifti.header), True,
                        nifti.affine)
    if suffix == ".png":
        return LabelMap(integer_labels(read_label_png(path), where), None, False)
    raise CaseReadError(f"{path}: not a label map file (.npz, .nii, .nii.gz or .png)")
