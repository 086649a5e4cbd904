"""Reading segmentation cases (challenge npz, NIfTI, DICOM, PNG/JPEG) and writing label maps.

Everything here is NumPy (+ nibabel, OpenCV, pydicom, all imported lazily): the deploy path
never imports JAX.

Input formats
-------------
* Challenge ``.npz`` (SPEC §6.1). Dispatch is by file name only: a name starting with ``3D`` is a
  3D case. Keys: ``imgs`` ((H, W, 3) or grey (H, W) for 2D, (D, H, W) for 3D), ``boxes`` ((N, 4)
  ``[x_min, y_min, x_max, y_max]`` or (N, 6) ``[x_min, y_min, z_min, x_max, y_max, z_max]``),
  optional ``spacing`` (3,) in the challenge's (x, y, z) order.
* NIfTI ``.nii`` / ``.nii.gz``: always a 3D case. See "NIfTI axis convention" and "NIfTI
  intensities" below.
* ``.png`` / ``.jpg`` / ``.jpeg``: a 2D case. Grey images are repeated to 3 channels, alpha is
  dropped, colour is RGB. 16-bit images whose maximum exceeds 255 are min-max scaled to 0..255
  (truncated, as ``pre_grey_rgb.py`` does); others are cast. EXIF orientation is ignored: boxes
  and outputs refer to the pixel grid as stored.
* DICOM (:mod:`rep_medsam_jax.io.dicom`): a single-frame ``.dcm`` file is a 2D case (output: a
  PNG label map); a sub-folder of DICOM files is one 3D series, read as a NIfTI volume on the
  series' voxel grid (i = column, j = row, k = slice in position order) with the affine of its
  DICOM geometry, and written as ``<folder>.nii.gz``. Boxes come from ``<stem>.json`` /
  ``<folder>.json`` next to the file / folder. Intensities: the Modality tag picks the rule
  (CT windowing in HU, else as for PNG in 2D and percentiles in 3D).

Coordinates: x is the column (W axis), y the row (H axis), z the slice (D axis). In-plane
coordinates may run up to the image size (x <= W, y <= H); z is a slice index with a closed
range, so z <= D - 1. A box with min > max on any axis is rejected.

JSON sidecar (boxes for NIfTI, DICOM and image inputs)
------------------------------------------------------
Next to ``<stem>.nii.gz`` / ``<stem>.png`` / ``<stem>.dcm`` / a series folder ``<stem>/``, a
file ``<stem>.json``::

    {
      "boxes": [[x_min, y_min, x_max, y_max], ...],                # 2D images
      "boxes": [[x_min, y_min, z_min, x_max, y_max, z_max], ...],  # NIfTI / DICOM series
      "labels": ["liver", "spleen"],    # optional: a name for label 1..N, one per box
      "modality": "CT",                 # optional, NIfTI only: intensity rule (below)
      "ct_window": [40, 400]            # optional, NIfTI + CT only: [level, width] in HU
    }

Label k of the output is the k-th box (1-based, the order of the list). For NIfTI, boxes are
**inclusive voxel indices of the file as stored** (x = first data axis i, y = j, z = k; the
indices a viewer such as ITK-SNAP or 3D Slicer shows as IJK), independent of this module's
internal axis order; :func:`read_case` maps them into the case's (D, H, W) array. A npz can also
carry the boxes itself; ``boxes_override`` (same conventions) replaces any stored boxes.

NIfTI axis convention
---------------------
The voxel array is reoriented (flips and axis permutations only, never resampled) to the
closest LPS orientation (x -> patient Left, y -> Posterior, z -> Superior; the DICOM / ITK
patient convention) and stored as (D, H, W) = (z, y, x). A slice ``image[d]`` is then an axial
slice in radiological display (anterior at the top, the patient's right on the image's left),
exactly what SimpleITK's ``GetArrayFromImage`` gives for an identity-direction image, i.e. what the
challenge's own npz files were made from. Writing applies the inverse, so the output label map
lies on the input's voxel grid; it keeps the input's affine and header (qform, sform, zooms,
units), with the data type set to uint8 (uint16 for 256+ labels), no intensity scaling and
cal_min/cal_max cleared.

NIfTI intensities (the rule of ``pre_CT_MR.py``, SPEC §6.2)
-----------------------------------------------------------
* modality ``"CT"``: clip to [level - width/2, level + width/2] (default level 40, width 400 HU),
  then min-max the clipped volume to 0..255.
* otherwise (MR, None, anything else): clip to the 0.5th / 99.5th percentiles of the voxels > 0
  (of all voxels if none is > 0), min-max to 0..255, and set voxels that were exactly 0 back to 0.
The result is truncated to uint8. A constant volume becomes all zeros. A volume read without a
modality whose values reach -900 or below (air in Hounsfield units) carries a note in
``Case.notes`` (the predictor prints it) suggesting the CT rule; the rule is not switched.

Errors
------
Every problem with one case raises a subclass of :class:`CaseError` (a ``ValueError``) whose
message names the file, so a predictor can report it and move on to the next case.

Outputs
-------
:func:`write_segmentation` writes under the input's name: ``<name>.npz`` with key ``segs``
(challenge), ``<name>.nii.gz`` / ``<name>.nii`` (the input's extension), or ``<name>.png`` (a
label map, also for JPEG inputs). Label maps are uint8, uint16 when a label is >= 256. Writes are
atomic (:func:`atomic_write`): a temporary file in the output folder, renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rep_medsam_jax.io import dicom
from rep_medsam_jax.preprocess import (DEFAULT_CT_WINDOW, PERCENTILES,  # noqa: F401
                                       min_max_to_uint8, percentile_to_uint8, window_ct)

NPZ_SUFFIXES = (".npz",)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (dicom.DICOM_SUFFIX,)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg") + DICOM_SUFFIXES
SUPPORTED_SUFFIXES = NPZ_SUFFIXES + NIFTI_SUFFIXES + IMAGE_SUFFIXES

LPS_AXCODES = ("L", "P", "S")
# Air is -1000 HU; other modalities are rarely this negative. Below it, a volume read without
# a modality gets a note suggesting CT windowing (never a silent change of rule).
LOOKS_LIKE_HU = -900.0

OutputFormat = Literal["npz", "nifti", "png"]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

class CaseError(ValueError):
    """A problem with one input case: report it and skip the case."""


class CaseReadError(CaseError):
    """The file cannot be read or decoded (corrupt, truncated, unsupported format)."""


class MissingKeyError(CaseError):
    """A required key is missing from a challenge npz."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


class MissingBoxesError(CaseError):
    """A case has no boxes: no ``boxes`` key, no JSON sidecar, no override, or an empty list."""


class SidecarError(CaseError):
    """The JSON sidecar is malformed or does not follow the schema."""


class ImageShapeError(CaseError):
    """The image has the wrong number of dimensions or channels for its case type."""


class EmptyImageError(ImageShapeError):
    """The image has a zero-size axis."""


class ImageDtypeError(CaseError):
    """The image is not uint8 and cannot be converted without changing its values."""


class NonFiniteImageError(CaseError):
    """The image contains NaN or infinite values."""


class SpacingError(CaseError):
    """The stored spacing is not three finite numbers."""


class BoxError(CaseError):
    """Base class of the box problems."""


class BoxShapeError(BoxError):
    """Boxes are not an (N, 4) / (N, 6) array of finite numbers."""


class BoxOutOfBoundsError(BoxError):
    """A box lies (partly) outside the image."""


class InvertedBoxError(BoxError):
    """A box has min > max on some axis."""


class SegmentationError(CaseError):
    """A label map handed to :func:`write_segmentation` does not fit its case."""


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------

def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:          # e.g. directories cannot be opened on Windows: best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed to ``path`` atomically.

    The temporary file lies in the same directory (so ``os.replace`` is a rename, never a copy)
    and ends with the final file name, so writers that pick the format from the extension
    (nibabel's ``.nii.gz``, OpenCV's ``.png``) behave as for ``path``. Its name starts with a dot,
    so :func:`discover_cases` never picks it up. If the block raises (anything, including
    KeyboardInterrupt) the temporary file is deleted and an existing ``path`` is left untouched.

        with atomic_write(out / "config.json") as tmp:
            tmp.write_text(json.dumps(config))
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".tmp-{secrets.token_hex(6)}-{final.name}")
    try:
        yield temporary
        if not temporary.exists():
            raise FileNotFoundError(f"atomic_write: nothing was written to {temporary}")
        if fsync:            # the data must be on disk before the rename makes it visible
            _fsync_path(temporary)
        os.replace(temporary, final)
        if fsync:
            _fsync_path(final.parent, directory=True)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


# --------------------------------------------------------------------------------------------
# The case record
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NiftiGeometry:
    """What is needed to write a label map back onto a NIfTI input's voxel grid.

    file_shape: the data shape as stored (may carry trailing singleton axes).
    file_to_lps: nibabel orientation transform, stored axes -> LPS axes (before the (z, y, x)
    transpose); its inverse is applied on writing.
    """

    affine: np.ndarray
    header: Any                    # nibabel.Nifti1Header / Nifti2Header
    image_class: type
    file_shape: tuple[int, ...]
    file_to_lps: np.ndarray


@dataclasses.dataclass(eq=False)
class Case:
    """One image or volume with its boxes, ready for inference.

    image: (H, W, 3) uint8 for 2D, (D, H, W) uint8 for 3D.
    boxes: (N, 4) [x_min, y_min, x_max, y_max] or (N, 6) [x_min, y_min, z_min, x_max, y_max,
        z_max] in the image array's pixels / voxels (int or float, as given).
    spacing: (3,) voxel size in the challenge's (x, y, z) order (W, H, D axes), or None.
    """

    name: str
    image: np.ndarray
    boxes: np.ndarray
    is_3d: bool
    source: Path
    output_format: OutputFormat
    spacing: np.ndarray | None = None
    labels: tuple[str, ...] | None = None
    nifti: NiftiGeometry | None = None
    output_suffix: str = ".npz"
    notes: tuple[str, ...] = ()       # things the user should know; the case still runs

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """(H, W) for 2D, (D, H, W) for 3D: the shape a label map for this case must have."""
        return tuple(self.image.shape) if self.is_3d else tuple(self.image.shape[:2])

    @property
    def output_name(self) -> str:
        """The file name of this case's prediction (the input's name)."""
        return self.name + self.output_suffix


# --------------------------------------------------------------------------------------------
# Discovery and names
# --------------------------------------------------------------------------------------------

def _matching_suffix(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:     # ".nii.gz" is tested before ".nii": order matters
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    return None


def case_name(path: str | os.PathLike) -> str:
    """The case name: the file name without its format suffix (``a.nii.gz`` -> ``a``); a DICOM
    series folder's name as it is."""
    path = Path(path)
    if path.is_dir():
        return path.name
    suffix = _matching_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def discover_cases(input_dir: str | os.PathLike) -> list[Path]:
    """The readable cases in a folder, sorted by name.

    Picks files ``.npz``, ``.nii``, ``.nii.gz``, ``.png``, ``.jpg``, ``.jpeg``, ``.dcm`` (any
    letter case) and sub-folders holding DICOM files (one series each, see
    :mod:`rep_medsam_jax.io.dicom`); skips hidden entries (e.g. this module's temporary files),
    JSON sidecars and folders without DICOM files.
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise NotADirectoryError(f"input folder {folder} does not exist or is not a folder")
    found = [p for p in folder.iterdir() if not p.name.startswith(".") and (
        (p.is_file() and _matching_suffix(p)) or (p.is_dir() and dicom.series_files(p)))]
    return sorted(found, key=lambda p: p.name)


def sidecar_path(path: str | os.PathLike) -> Path:
    """``<folder>/<stem>.json`` for ``<folder>/<stem>.<ext>``."""
    path = Path(path)
    return path.with_name(case_name(path) + ".json")


# --------------------------------------------------------------------------------------------
# Validation helpers (shared by all formats)
# --------------------------------------------------------------------------------------------

def _to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """uint8 as is; integers (or whole-valued floats) within 0..255 converted; else an error."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ImageDtypeError(f"{where}: image dtype {array.dtype} is not numeric")
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
            f"{where}: image dtype {array.dtype} has values in [{low}, {high}], outside the "
            "uint8 range 0..255; convert the intensities to uint8 first")
    return array.astype(np.uint8)


def _check_not_empty(array: np.ndarray, where: str) -> None:
    if array.size == 0:
        raise EmptyImageError(f"{where}: image is empty (shape {array.shape})")


def _as_rgb(image: np.ndarray, where: str) -> np.ndarray:
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


def validate_boxes(boxes: Any, spatial_shape: Sequence[int], where: str,
                   clip_depth: bool = False) -> np.ndarray:
    """Check boxes against an image of ``spatial_shape`` ((H, W) or (D, H, W)).

    Returns the boxes as a numeric (N, 4) / (N, 6) array (dtype kept: int or float). Raises
    MissingBoxesError (N == 0), BoxShapeError, BoxOutOfBoundsError, InvertedBoxError.

    ``clip_depth`` (challenge npz files): a 3D box whose z_max runs past the last slice is
    clipped to D - 1 instead of rejected, as the reference's per-box loop does (its embedding
    loop crashed on such boxes: a reference bug we fix). A box starting past the volume is
    still an error.
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


# --------------------------------------------------------------------------------------------
# Sidecar
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sidecar:
    """The parsed JSON sidecar (see the module docstring)."""

    boxes: list
    labels: tuple[str, ...] | None = None
    modality: str | None = None
    ct_window: tuple[float, float] | None = None


def read_sidecar(path: str | os.PathLike) -> Sidecar:
    """Parse and check ``<stem>.json``; raises SidecarError / MissingBoxesError."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SidecarError(f"{path}: cannot read the JSON sidecar: {err}") from None
    if not isinstance(content, dict):
        raise SidecarError(f"{path}: the sidecar must be a JSON object with a 'boxes' list")
    unknown = set(content) - {"boxes", "labels", "modality", "ct_window"}
    if unknown:
        raise SidecarError(f"{path}: unknown sidecar key(s) {sorted(unknown)}; allowed: "
                           "boxes, labels, modality, ct_window")
    if "boxes" not in content:
        raise MissingBoxesError(f"{path}: the sidecar has no 'boxes' key")
    boxes = content["boxes"]
    if not isinstance(boxes, list) or not all(isinstance(b, list) for b in boxes):
        raise SidecarError(f"{path}: 'boxes' must be a list of boxes, each a list of numbers")
    labels = content.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise SidecarError(f"{path}: 'labels' must be a list of strings")
        if len(labels) != len(boxes):
            raise SidecarError(f"{path}: {len(labels)} label(s) for {len(boxes)} box(es)")
        labels = tuple(labels)
    modality = content.get("modality")
    if modality is not None and not isinstance(modality, str):
        raise SidecarError(f"{path}: 'modality' must be a string such as \"CT\" or \"MR\"")
    window = content.get("ct_window")
    if window is not None:
        if (not isinstance(window, list) or len(window) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in window) or window[1] <= 0):
            raise SidecarError(f"{path}: 'ct_window' must be [level, width] with width > 0")
        window = (float(window[0]), float(window[1]))
    return Sidecar(boxes=boxes, labels=labels, modality=modality, ct_window=window)


def _sidecar_or_none(path: Path) -> Sidecar | None:
    candidate = sidecar_path(path)
    return read_sidecar(candidate) if candidate.is_file() else None


# --------------------------------------------------------------------------------------------
# Intensities and NIfTI orientation (public: the phantom / MNI generators reuse them)
# --------------------------------------------------------------------------------------------

def intensities_to_uint8(volume: np.ndarray, modality: str | None = None,
                         ct_window: tuple[float, float] | None = None) -> np.ndarray:
    """The NIfTI intensity rule: CT windowing when ``modality`` is "CT" (any case), else
    percentile clipping (see the module docstring)."""
    if modality is not None and modality.upper() == "CT":
        level, width = ct_window or DEFAULT_CT_WINDOW
        return window_ct(volume, level, width)
    return percentile_to_uint8(volume)


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


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

def _read_npz(path: Path, boxes_override: Any | None) -> Case:
    name = case_name(path)
    is_3d = name.startswith("3D")     # SPEC §6.1: dispatch by file name only
    where = str(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):    # a bare .npy under an .npz name
            raise CaseReadError(f"{where}: not an npz archive (a single array); save it with "
                                "np.savez(path, imgs=..., boxes=...)")
        with loaded as archive:
            keys = set(archive.files)
            if "imgs" not in keys:
                raise MissingKeyError(
                    f"{where}: missing key 'imgs' (the image); keys present: {sorted(keys)}",
                    key="imgs")
            image = archive["imgs"]
            stored_boxes = archive["boxes"] if "boxes" in keys else None
            spacing = archive["spacing"] if "spacing" in keys else None
    except CaseError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise CaseReadError(f"{where}: cannot read the npz: {err}") from None

    _check_not_empty(image, where)
    image = _to_uint8(image, where)
    if is_3d:
        if image.ndim != 3:
            raise ImageShapeError(f"{where}: a 3D case ('3D...' name) needs imgs of shape "
                                  f"(D, H, W), got {image.shape}")
        spatial = image.shape
    else:
        image = _as_rgb(image, where)
        spatial = image.shape[:2]

    if boxes_override is not None:
        boxes = boxes_override
    elif stored_boxes is not None:
        boxes = stored_boxes
    else:
        raise MissingBoxesError(f"{where}: missing key 'boxes' and no boxes were given")
    boxes = validate_boxes(boxes, spatial, where, clip_depth=is_3d)
    if spacing is not None:
        spacing = _validate_spacing(spacing, where)
    return Case(name=name, image=image, boxes=boxes, is_3d=is_3d, source=path,
                output_format="npz", spacing=spacing, output_suffix=".npz")


def _boxes_from_sidecar_or_override(path: Path, sidecar: Sidecar | None,
                                    boxes_override: Any | None) -> Any:
    if boxes_override is not None:
        return boxes_override
    if sidecar is None:
        raise MissingBoxesError(
            f"{path}: no boxes: write them to {sidecar_path(path).name} next to the image "
            '(e.g. {"boxes": [[x_min, y_min, x_max, y_max]]}) or pass them explicitly')
    return sidecar.boxes


def _read_nifti(path: Path, suffix: str, boxes_override: Any | None, modality: str | None,
                ct_window: tuple[float, float] | None) -> Case:
    import nibabel as nib  # noqa: PLC0415

    where = str(path)
    try:
        nifti = nib.load(path)
        if not isinstance(nifti, (nib.Nifti1Image, nib.Nifti2Image)):
            raise CaseReadError(f"{where}: not a NIfTI-1/2 image ({type(nifti).__name__})")
        # Applies scl_slope / scl_inter; unscaled integer data keep their (small) dtype.
        data = np.asanyarray(nifti.dataobj)
    except CaseError:
        raise
    except Exception as err:       # nibabel raises many types for broken files
        raise CaseReadError(f"{where}: cannot read the NIfTI: {err}") from None

    return _volume_case(path, data, nifti.affine, nifti.header, type(nifti), suffix,
                        _sidecar_or_none(path), boxes_override, modality, ct_window)


def _volume_case(path: Path, data: np.ndarray, affine: np.ndarray, header: Any,
                 image_class: type, output_suffix: str, sidecar: Sidecar | None,
                 boxes_override: Any | None, modality: str | None,
                 ct_window: tuple[float, float] | None) -> Case:
    """A 3D case from a stored voxel grid (X, Y, Z[, 1...]) and its NIfTI geometry (NIfTI files
    and DICOM series): reoriented to LPS (D, H, W), intensities to uint8, boxes mapped."""
    where = str(path)
    file_shape = tuple(data.shape)
    _check_not_empty(data, where)
    if data.dtype == np.bool_ or not np.issubdtype(data.dtype, np.number):
        raise ImageDtypeError(f"{where}: voxel type {data.dtype} is not a scalar intensity "
                              "(RGB / complex NIfTI volumes are not supported)")
    volume = three_axes(data, where)
    if np.issubdtype(volume.dtype, np.floating) and not np.all(np.isfinite(volume)):
        bad = int(np.count_nonzero(~np.isfinite(volume)))
        raise NonFiniteImageError(f"{where}: volume has {bad} NaN or infinite voxel(s)")

    modality = modality or (sidecar.modality if sidecar else None)
    ct_window = ct_window or (sidecar.ct_window if sidecar else None)
    array, file_to_lps = volume_to_dhw(volume, affine)
    image = np.ascontiguousarray(intensities_to_uint8(array, modality, ct_window))
    notes = ()
    lowest = float(volume.min())
    if modality is None and lowest <= LOOKS_LIKE_HU:
        notes = (f"no modality given and values reach {lowest:g}, as a CT in Hounsfield units "
                 "does: the percentile rule was used; for CT windowing set \"modality\": "
                 "\"CT\" in the sidecar or pass --modality CT",)

    voxel_boxes = validate_boxes(
        _boxes_from_sidecar_or_override(path, sidecar, boxes_override),
        volume.shape[::-1], f"{where} (boxes in stored voxel indices i, j, k)")
    # Stored indices are inclusive on every axis: x, y must also stay below X, Y.
    too_far = np.any(voxel_boxes[:, 3:5] > np.array(volume.shape[:2]) - 1, axis=1)
    if np.any(too_far):
        index = int(np.argmax(too_far))
        raise BoxOutOfBoundsError(
            f"{where}: box {index + 1} {voxel_boxes[index].tolist()} lies outside the volume "
            f"of {volume.shape[0]}x{volume.shape[1]}x{volume.shape[2]} voxels (i, j, k are "
            "inclusive voxel indices)")
    boxes = boxes_voxel_to_dhw(voxel_boxes, volume.shape, file_to_lps)

    zooms = header_zooms(header)
    spacing = np.empty(3)
    for stored_axis in range(3):     # (x, y, z) = the LPS axes the stored axes went to
        spacing[int(file_to_lps[stored_axis, 0])] = zooms[stored_axis]

    geometry = NiftiGeometry(affine=np.array(affine, np.float64), header=header.copy(),
                             image_class=image_class, file_shape=file_shape,
                             file_to_lps=file_to_lps)
    return Case(name=case_name(path), image=image, boxes=boxes, is_3d=True, source=path,
                output_format="nifti", spacing=spacing,
                labels=sidecar.labels if sidecar and boxes_override is None else None,
                nifti=geometry, output_suffix=output_suffix, notes=notes)


def _decode_image(path: Path) -> np.ndarray:
    import cv2  # noqa: PLC0415

    try:
        encoded = np.fromfile(path, dtype=np.uint8)   # not cv2.imread: handles any path text
    except OSError as err:
        raise CaseReadError(f"{path}: cannot read the image: {err}") from None
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if encoded.size else None
    if decoded is None:
        raise CaseReadError(f"{path}: cannot decode the image (corrupt or not a PNG/JPEG)")
    if decoded.ndim == 3 and decoded.shape[2] == 3:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    elif decoded.ndim == 3 and decoded.shape[2] == 4:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)    # drops alpha
    return decoded


def _read_image(path: Path, boxes_override: Any | None, modality: str | None = None,
                ct_window: tuple[float, float] | None = None) -> Case:
    """A 2D case from a PNG / JPEG, or a single-frame DICOM file (output: a PNG label map)."""
    where = str(path)
    sidecar = _sidecar_or_none(path)
    if path.name.lower().endswith(DICOM_SUFFIXES):
        image = dicom.read_dicom_image(path, modality or (sidecar.modality if sidecar else None),
                                       ct_window or (sidecar.ct_window if sidecar else None))
    else:
        image = _decode_image(path)
    _check_not_empty(image, where)
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
            raise NonFiniteImageError(f"{where}: image has NaN or infinite pixels")
        # pre_grey_rgb.py: images whose maximum exceeds 255 are min-max scaled.
        image = min_max_to_uint8(image) if image.max() > 255 else _to_uint8(image, where)
    image = _as_rgb(image, where)
    boxes = validate_boxes(_boxes_from_sidecar_or_override(path, sidecar, boxes_override),
                           image.shape[:2], where)
    return Case(name=case_name(path), image=image, boxes=boxes, is_3d=False, source=path,
                output_format="png",
                labels=sidecar.labels if sidecar and boxes_override is None else None,
                output_suffix=".png")


def read_case(path: str | os.PathLike, boxes_override: Any | None = None, *,
              modality: str | None = None,
              ct_window: tuple[float, float] | None = None) -> Case:
    """Read and validate one case.

    path: a challenge ``.npz``, a NIfTI ``.nii`` / ``.nii.gz``, a ``.png`` / ``.jpg`` /
        ``.jpeg`` / ``.dcm`` file or a DICOM series folder (boxes for all but npz come from the
        JSON sidecar ``<stem>.json``).
    boxes_override: (N, 4) / (N, 6) boxes replacing any stored ones (for NIfTI and DICOM
        series: in stored voxel indices, like the sidecar).
    modality / ct_window: NIfTI and DICOM only, the intensity rule (overrides the sidecar's and
        the DICOM Modality tag); ignored for npz (already uint8) and PNG / JPEG.
    Raises a :class:`CaseError` subclass for any problem with the case.
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path, boxes_override, modality, ct_window)
    suffix = _matching_suffix(path)
    if suffix is None:
        raise CaseReadError(f"{path}: unsupported file type; expected one of "
                            f"{', '.join(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise CaseReadError(f"{path}: no such file")
    if suffix in NPZ_SUFFIXES:
        return _read_npz(path, boxes_override)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path, path.name[-len(suffix):], boxes_override, modality, ct_window)
    return _read_image(path, boxes_override, modality, ct_window)


def _read_dicom_series(folder: Path, boxes_override: Any | None, modality: str | None,
                       ct_window: tuple[float, float] | None) -> Case:
    import nibabel as nib  # noqa: PLC0415

    series = dicom.read_dicom_series(folder)
    header = nib.Nifti1Header()
    header.set_data_shape(series.volume.shape)
    header.set_data_dtype(np.float32)
    header.set_qform(series.affine, code=1)      # 1: scanner coordinates
    header.set_sform(series.affine, code=1)
    sidecar = _sidecar_or_none(folder)
    modality = modality or (sidecar.modality if sidecar else None) or series.modality
    return _volume_case(folder, series.volume, series.affine, header, nib.Nifti1Image,
                        ".nii.gz", sidecar, boxes_override, modality, ct_window)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------

def _label_map(case: Case, segs: np.ndarray) -> np.ndarray:
    """Check a label map against its case; uint8, or uint16 when a label is >= 256."""
    segs = np.asarray(segs)
    where = f"{case.source} (output)"
    if tuple(segs.shape) != case.spatial_shape:
        raise SegmentationError(f"{where}: label map shape {segs.shape} does not match the "
                                f"image's {case.spatial_shape}")
    if segs.dtype == np.bool_:
        segs = segs.astype(np.uint8)
    if not np.issubdtype(segs.dtype, np.integer):
        raise SegmentationError(f"{where}: label map must hold integers, got {segs.dtype}")
    if segs.size and (segs.min() < 0 or segs.max() > np.iinfo(np.uint16).max):
        raise SegmentationError(f"{where}: labels must lie in 0..65535, got "
                                f"[{segs.min()}, {segs.max()}]")
    big = segs.size and segs.max() >= 256
    return segs.astype(np.uint16 if big else np.uint8, copy=False)


def write_segmentation(case: Case, segs: np.ndarray, output_dir: str | os.PathLike) -> Path:
    """Write a case's label map under the input's name in ``output_dir``, atomically.

    segs: (H, W) for 2D, (D, H, W) for 3D (``case.spatial_shape``), integer labels 0..65535.
    Returns the written path. Raises SegmentationError (a CaseError) if segs does not fit.
    """
    labels = _label_map(case, segs)
    target = Path(output_dir) / case.output_name
    if case.output_format == "npz":
        with atomic_write(target) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, segs=labels)
    elif case.output_format == "png":
        import cv2  # noqa: PLC0415

        ok, encoded = cv2.imencode(".png", labels)
        if not ok:
            raise OSError(f"{target}: PNG encoding failed")
        write_bytes_atomic(target, encoded.tobytes())
    elif case.output_format == "nifti":
        geometry = case.nifti
        if geometry is None:
            raise SegmentationError(f"{case.source}: NIfTI case without its geometry")
        voxels = dhw_to_volume(labels, geometry.file_to_lps).reshape(geometry.file_shape)
        header = geometry.header.copy()
        header.set_data_dtype(labels.dtype)
        header.set_slope_inter(1.0, 0.0)        # labels are stored as they are, unscaled
        header["cal_min"], header["cal_max"] = 0, 0
        # affine=None: nibabel takes qform and sform (matrices and codes) from the header as
        # they are, instead of rewriting them from one affine.
        output = geometry.image_class(voxels, None, header=header)
        with atomic_write(target) as tmp:
            output.to_filename(tmp)
    else:
        raise SegmentationError(f"{case.source}: unknown output format {case.output_format!r}")
    return target
