"""Which format a path is, and the case name it gives (the file name without its suffix)."""

from __future__ import annotations

import os
from pathlib import Path

NPZ_SUFFIXES = (".npz",)
NIFTI_SUFFIXES = (".nii.gz", ".nii")      # ".nii.gz" before ".nii": matched in this order
DICOM_SUFFIX = ".dcm"
DICOM_SUFFIXES = (DICOM_SUFFIX,)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg") + DICOM_SUFFIXES
SUPPORTED_SUFFIXES = NPZ_SUFFIXES + NIFTI_SUFFIXES + IMAGE_SUFFIXES


def matching_suffix(path: str | os.PathLike) -> str | None:
    """The supported suffix ``path``'s name ends with (any letter case), or None."""
    lower = Path(path).name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    return None


def case_name(path: str | os.PathLike) -> str:
    """The case name: the file name without its format suffix (``a.nii.gz`` -> ``a``); a DICOM
    series folder's name as it is."""
    path = Path(path)
    if path.is_dir():
        return path.name
    suffix = matching_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def is_3d_name(name: str) -> bool:
    """The challenge's dispatch rule for npz files: a name starting with ``3D`` is a volume."""
    return name.startswith("3D")
