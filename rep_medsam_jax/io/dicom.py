"""DICOM input: one ``.dcm`` file is a 2D image; a folder of DICOM files is one 3D series.

pydicom (pure Python) is imported only when a DICOM case is read. Uncompressed, deflated and
RLE pixel data decode with pydicom alone; JPEG / JPEG-LS / JPEG 2000 need pydicom's optional
decoder packages (pylibjpeg, ...), and a file that cannot be decoded is a
:class:`~rep_medsam_jax.io.CaseReadError` that says so.

2D (a single-frame file)
------------------------
The pixel grid as stored: x is the column, y the row. Grey images go through the modality LUT
(RescaleSlope / RescaleIntercept: HU for CT), then to uint8 by the rule of their modality:
CT (the Modality tag, or the sidecar's ``modality``) is windowed like a CT volume (default level
40, width 400, or the sidecar's ``ct_window``); anything else is cast when its values are
whole numbers within 0..255, and min-max scaled to 0..255 otherwise (the PNG rule of
``pre_grey_rgb.py``). MONOCHROME1 images (white = lowest value, common for X-rays) are then
inverted, so every image reaches the model with bright meaning high signal. RGB / YBR colour
images must be 8-bit and are read as RGB. Multi-frame files are rejected: put the frames in a
series folder or convert them to NIfTI.

3D (a series folder)
--------------------
Every non-hidden file in the folder whose name ends in ``.dcm`` or that carries the DICOM
preamble (``DICM`` at byte 128; PACS exports often have no extension) and describes an image
(Rows and Columns) is a slice (a DICOMDIR or a structured report in the folder is skipped). The
slices must share one SeriesInstanceUID, image size, orientation and pixel spacing, and lie at
distinct positions with even spacing (within 1 %; an uneven stack has no single voxel grid).
They are ordered by their position along the slice normal (ImagePositionPatient projected on
row x column direction), not by file name or InstanceNumber. The series is read as a voxel
grid (i = column, j = row, k = slice in that order) with the scanner-space affine the DICOM
geometry defines, converted from DICOM's LPS to NIfTI's RAS. From there it is a NIfTI case
(:mod:`rep_medsam_jax.io.cases`): boxes are inclusive (i, j, k) indices in that grid, the
intensity rule follows the Modality tag (CT windowing, else percentiles), and the output is
``<folder>.nii.gz`` on that grid with that affine (qform and sform, code 1 = scanner).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from rep_medsam_jax.io.errors import (CaseReadError, ImageDtypeError, ImageShapeError,
                                      check_not_empty)
from rep_medsam_jax.io.formats import DICOM_SUFFIX
from rep_medsam_jax.io.intensity import DEFAULT_CT_WINDOW, min_max_to_uint8, window_ct

_PREAMBLE = 128              # bytes before the "DICM" magic of a DICOM Part 10 file
_SPACING_TOLERANCE = 0.01    # relative spread of the slice gaps allowed in one series
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def has_dicom_preamble(path: str | os.PathLike) -> bool:
    """True when the file carries the Part 10 magic ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_PREAMBLE + 4)
    except OSError:
        return False
    return head[_PREAMBLE:] == b"DICM"


def series_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files of a series folder (``.dcm`` names or the DICM preamble), sorted by name."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    return sorted((p for p in entries if p.is_file() and not p.name.startswith(".")
                   and (p.name.lower().endswith(DICOM_SUFFIX) or has_dicom_preamble(p))),
                  key=lambda p: p.name)


def _pydicom():
    try:
        import pydicom  # noqa: PLC0415
    except ImportError:
        raise CaseReadError(
            "reading DICOM needs pydicom: pip install pydicom==3.0.2") from None
    return pydicom


def _parse(path: Path, headers_only: bool = False):
    """The parsed file (without its pixel data when ``headers_only``); CaseReadError when it
    cannot be read."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=headers_only)
    except Exception as err:       # pydicom raises many types for broken files
        raise CaseReadError(f"{path}: cannot read the DICOM file: {err}") from None


def _read_dataset(path: Path):
    """The parsed file, with its pixel data present; CaseReadError otherwise."""
    dataset = _parse(path)
    if "PixelData" not in dataset:
        raise CaseReadError(f"{path}: the DICOM file has no pixel data "
                                      f"(SOP class {dataset.get('SOPClassUID', 'unknown')})")
    return dataset


def _frames(dataset) -> int:
    try:
        return int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _pixels(dataset, path: Path) -> np.ndarray:
    try:
        return dataset.pixel_array
    except Exception as err:       # missing decoder plug-in, truncated pixel data, ...
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown") \
            if hasattr(dataset, "file_meta") else "unknown"
        raise CaseReadError(
            f"{path}: cannot decode the pixel data (transfer syntax {syntax}): {err}") from None


def _modality_values(dataset, pixels: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (RescaleSlope / Intercept or a modality LUT), float64."""
    from pydicom.pixels import apply_modality_lut  # noqa: PLC0415

    return np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)


def modality_of(dataset) -> str | None:
    value = str(dataset.get("Modality", "") or "").strip().upper()
    return value or None


def grey_to_uint8(values: np.ndarray, modality: str | None,
                  ct_window: tuple[float, float] | None, monochrome1: bool) -> np.ndarray:
    """One grey 2D image in modality values -> uint8 (the 2D rule of the module docstring)."""
    if modality == "CT":
        image = window_ct(values, *(ct_window or DEFAULT_CT_WINDOW))
    elif np.all(values == np.round(values)) and values.min() >= 0 and values.max() <= 255:
        image = values.astype(np.uint8)
    else:
        image = min_max_to_uint8(values)
    return 255 - image if monochrome1 else image


def read_dicom_image(path: str | os.PathLike, modality: str | None = None,
                     ct_window: tuple[float, float] | None = None) -> np.ndarray:
    """A single-frame DICOM file -> (H, W) grey or (H, W, 3) RGB uint8 (module docstring).

    modality: overrides the file's Modality tag (e.g. from the JSON sidecar).
    """
    path = Path(path)
    dataset = _read_dataset(path)
    if _frames(dataset) > 1:
        raise ImageShapeError(
            f"{path}: a multi-frame DICOM ({_frames(dataset)} frames) is not a 2D image; put "
            "single-frame slices in a series folder, or convert the file to NIfTI")
    pixels = _pixels(dataset, path)
    check_not_empty(pixels, str(path))
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples == 3:
        if pixels.dtype != np.uint8:
            raise ImageDtypeError(f"{path}: colour DICOM with {pixels.dtype} samples; "
                                        "only 8-bit colour is supported")
        return np.ascontiguousarray(pixels)      # pydicom returns YBR data converted to RGB
    if samples != 1 or pixels.ndim != 2:
        raise ImageShapeError(f"{path}: expected one grey or RGB frame, got pixel data "
                                    f"of shape {pixels.shape} with {samples} sample(s) per pixel")
    values = _modality_values(dataset, pixels)
    modality = (modality or modality_of(dataset) or "").upper() or None
    photometric = str(dataset.get("PhotometricInterpretation", "")).upper()
    return grey_to_uint8(values, modality, ct_window, photometric == "MONOCHROME1")


@dataclasses.dataclass(frozen=True)
class DicomSeries:
    """A DICOM series as a voxel grid.

    volume: (X, Y, Z) = (columns, rows, slices) float32 modality values (HU for CT); a
        transposed view of a (slices, rows, columns) array.
    affine: (4, 4) voxel (i, j, k) -> scanner RAS millimetres, NIfTI's convention.
    modality: the Modality tag of the first slice (upper case), or None.
    """

    volume: np.ndarray
    affine: np.ndarray
    modality: str | None


def _float_list(dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    value = dataset.get(keyword)
    try:
        array = np.array([float(v) for v in value], np.float64)
    except (TypeError, ValueError):
        array = np.array([])
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise CaseReadError(f"{path}: {keyword} must be {count} numbers for a slice "
                                      f"of a 3D series, got {value!r}")
    return array


def _slice_geometry(dataset, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(orientation (6,), position (3,), pixel spacing (2,) [row gap, column gap]) in mm / LPS."""
    orientation = _float_list(dataset, "ImageOrientationPatient", 6, path)
    position = _float_list(dataset, "ImagePositionPatient", 3, path)
    spacing = _float_list(dataset, "PixelSpacing", 2, path)
    if np.any(spacing <= 0):
        raise CaseReadError(f"{path}: PixelSpacing must be positive, got {spacing}")
    return orientation, position, spacing


def _check_same(values: list, name: str, folder: Path, close: bool = False) -> None:
    first = values[0]
    for index, value in enumerate(values[1:], start=1):
        same = np.allclose(value, first, atol=1e-4) if close else value == first
        if not same:
            raise CaseReadError(
                f"{folder}: the slices differ in {name} ({first} in the first slice, {value} in "
                f"slice file {index + 1}); a series folder must hold one series")


def read_dicom_series(folder: str | os.PathLike) -> DicomSeries:
    """A folder of single-frame DICOM slices -> :class:`DicomSeries` (module docstring)."""
    folder = Path(folder)
    files = series_files(folder)
    if not files:
        raise CaseReadError(f"{folder}: no DICOM files in the series folder")
    # Headers first (geometry, order); each slice's pixels are read later, one file at a time,
    # so a series never holds its raw and decoded pixels in memory at once.
    parsed = [(path, _parse(path, headers_only=True)) for path in files]
    # Objects without an image (a DICOMDIR, structured reports, presentation states) are not
    # slices: skipped, as viewers do.
    images = [(path, dataset) for path, dataset in parsed
              if "Rows" in dataset and "Columns" in dataset]
    if not images:
        raise CaseReadError(f"{folder}: none of the {len(files)} DICOM file(s) holds an "
                                  "image")
    files, datasets = [path for path, _ in images], [dataset for _, dataset in images]
    for path, dataset in zip(files, datasets):
        if _frames(dataset) > 1:
            raise ImageShapeError(f"{path}: multi-frame DICOM files are not supported in "
                                        "a series folder; convert the series to NIfTI")
        if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
            raise ImageShapeError(f"{path}: a 3D series must be grey (one sample per "
                                        "pixel)")
    _check_same([str(d.get("SeriesInstanceUID", "")) for d in datasets], "SeriesInstanceUID",
                folder)
    _check_same([(d.get("Rows"), d.get("Columns")) for d in datasets],
                "image size (rows, columns)", folder)
    geometry = [_slice_geometry(d, p) for d, p in zip(datasets, files)]
    _check_same([g[0] for g in geometry], "ImageOrientationPatient", folder, close=True)
    _check_same([g[2] for g in geometry], "PixelSpacing", folder, close=True)

    orientation, _, (row_gap, column_gap) = geometry[0]
    along_row, along_column = orientation[:3], orientation[3:]   # +column index, +row index
    normal = np.cross(along_row, along_column)
    heights = np.array([g[1] @ normal for g in geometry])
    order = np.argsort(heights, kind="stable")
    heights = heights[order]
    gaps = np.diff(heights)
    if gaps.size and np.min(gaps) < 1e-3:
        raise CaseReadError(f"{folder}: two slices lie at the same position "
                                  f"({heights[int(np.argmin(gaps))]:.3f} mm along the normal)")
    if gaps.size and (np.max(gaps) - np.min(gaps)) > _SPACING_TOLERANCE * np.median(gaps):
        raise CaseReadError(
            f"{folder}: uneven slice spacing ({np.min(gaps):.3f} to {np.max(gaps):.3f} mm, "
            "missing slices?); resample the series or convert it to NIfTI")

    positions = np.stack([geometry[int(i)][1] for i in order])
    if len(positions) > 1:
        # The mean step between slice origins: follows a gantry tilt, which a normal would not.
        slice_step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        thickness = float(datasets[0].get("SliceThickness", 1.0) or 1.0)
        slice_step = normal * (thickness if thickness > 0 else 1.0)
    lps = np.eye(4)
    lps[:3, 0] = along_row * column_gap
    lps[:3, 1] = along_column * row_gap
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]

    # float32 holds every HU exactly at half float64's memory (a 512 x 512 x 300 CT: 315 MB);
    # slices are converted one at a time, each with its own rescale.
    # Every slice has the checked (Rows, Columns): pydicom decodes a single frame to that shape.
    volume = np.empty((len(order), int(datasets[0].Rows), int(datasets[0].Columns)), np.float32)
    for position, index in enumerate(order):
        path = files[int(index)]
        dataset = _read_dataset(path)
        volume[position] = _modality_values(dataset, _pixels(dataset, path))
    # (k, rows, cols) -> (i, j, k), a view: an axial series goes back to (k, rows, cols) when
    # the case is laid out as (D, H, W), without a copy.
    return DicomSeries(volume=volume.transpose(2, 1, 0), affine=_LPS_TO_RAS @ lps,
                       modality=modality_of(datasets[int(order[0])]))
