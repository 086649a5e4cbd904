"""NIfTI-1 / NIfTI-2 volumes (nibabel), and the volume -> model-array rule shared with DICOM.

A stored volume is read as it is (scl_slope / scl_inter applied; unscaled integer data keep
their small dtype), checked (one scalar 3D volume, finite), reoriented to the (D, H, W) axial
array of :mod:`rep_medsam_jax.io.orientation`, and its intensities converted to uint8 by the rule
of :mod:`rep_medsam_jax.io.intensity`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from rep_medsam_jax.io.errors import CaseError, CaseReadError, ImageDtypeError, check_not_empty
from rep_medsam_jax.io.intensity import check_finite, intensities_to_uint8
from rep_medsam_jax.io.orientation import three_axes, volume_to_dhw


@dataclasses.dataclass(frozen=True)
class NiftiFile:
    """data: the voxels as stored (scaled), any rank; affine (4, 4); header and image class
    (what a label map written back needs)."""

    data: np.ndarray
    affine: np.ndarray
    header: Any
    image_class: type


def load_nifti(path: str | os.PathLike) -> NiftiFile:
    """Read a ``.nii`` / ``.nii.gz``; CaseReadError naming the file when it cannot be read."""
    import nibabel as nib  # noqa: PLC0415

    path = Path(path)
    try:
        image = nib.load(path)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise CaseReadError(f"{path}: not a NIfTI-1/2 image ({type(image).__name__})")
        data = np.asanyarray(image.dataobj)
    except CaseError:
        raise
    except Exception as err:       # nibabel raises many types for broken files
        raise CaseReadError(f"{path}: cannot read the NIfTI: {err}") from None
    return NiftiFile(data, np.asarray(image.affine), image.header, type(image))


def scalar_volume(data: np.ndarray, where: str) -> np.ndarray:
    """Stored voxels -> (X, Y, Z) intensities: not empty, a scalar number type, one volume
    (trailing singleton axes dropped), finite."""
    check_not_empty(data, where)
    if data.dtype == np.bool_ or not np.issubdtype(data.dtype, np.number):
        raise ImageDtypeError(f"{where}: voxel type {data.dtype} is not a scalar intensity "
                              "(RGB / complex NIfTI volumes are not supported)")
    volume = three_axes(data, where)
    check_finite(volume, where)
    return volume


def model_volume(volume: np.ndarray, affine: np.ndarray, modality: str | None,
                 ct_window: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) intensities -> ((D, H, W) uint8 axial array, the orientation transform that
    :func:`rep_medsam_jax.io.orientation.dhw_to_volume` inverts)."""
    array, file_to_lps = volume_to_dhw(volume, affine)
    return np.ascontiguousarray(intensities_to_uint8(array, modality, ct_window)), file_to_lps
