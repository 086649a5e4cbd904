"""Inference cases: read one case of any supported format, and write its label map back.

Formats (one module each): challenge ``.npz`` (:mod:`~rep_medsam_jax.io.npz`), NIfTI
``.nii`` / ``.nii.gz`` (:mod:`~rep_medsam_jax.io.nifti`, always 3D), ``.png`` / ``.jpg`` /
``.jpeg`` (:mod:`~rep_medsam_jax.io.images`, 2D) and DICOM (:mod:`~rep_medsam_jax.io.dicom`: a
``.dcm`` file is 2D, a sub-folder of DICOM files one 3D series, read as a NIfTI volume on the
series' voxel grid and written as ``<folder>.nii.gz``). Boxes for all but npz come from the JSON
sidecar ``<stem>.json`` (:mod:`~rep_medsam_jax.io.sidecar`).

Boxes: label k of the output is the k-th box (1-based, the order of the list). For NIfTI and
DICOM series, boxes are **inclusive voxel indices of the file as stored** (x = first data axis i,
y = j, z = k; the indices a viewer such as ITK-SNAP or 3D Slicer shows as IJK), independent of
the (D, H, W) array the model sees; :func:`read_case` maps them into it
(:mod:`~rep_medsam_jax.io.orientation`). A npz can carry the boxes itself; ``boxes_override``
(same conventions) replaces any stored boxes.

Intensities (:mod:`~rep_medsam_jax.io.intensity`): npz images are uint8 already; PNG / JPEG as
described there; volumes by the CT window or the percentile rule of ``pre_CT_MR.py``. A volume
read without a modality whose values reach -900 or below (air in Hounsfield units) carries a
note in ``Case.notes`` (the predictor prints it) suggesting the CT rule; the rule is not
switched.

Outputs: :func:`write_segmentation` writes under the input's name: ``<name>.npz`` with key
``segs`` (challenge), ``<name>.nii.gz`` / ``<name>.nii`` (the input's extension, on the input's
voxel grid, keeping its affine and header: qform, sform, zooms, units; data type uint8 or uint16,
no intensity scaling, cal_min / cal_max cleared), or ``<name>.png`` (a label map, also for JPEG
and DICOM inputs). Label maps are uint8, uint16 when a label is >= 256. Writes are atomic
(:mod:`~rep_medsam_jax.io.atomic`).

Every problem with one case raises a :class:`~rep_medsam_jax.io.errors.CaseError`. NumPy,
OpenCV, nibabel and pydicom only (the last two imported when first needed): never JAX.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rep_medsam_jax.io import dicom
from rep_medsam_jax.io.atomic import atomic_write, write_bytes_atomic
from rep_medsam_jax.io.boxes import validate_boxes, validate_spacing
from rep_medsam_jax.io.errors import (BoxOutOfBoundsError, CaseReadError, MissingBoxesError,
                                      SegmentationError)
from rep_medsam_jax.io.formats import (NIFTI_SUFFIXES, NPZ_SUFFIXES, SUPPORTED_SUFFIXES,
                                       case_name, is_3d_name, matching_suffix)
from rep_medsam_jax.io.images import decode_image, image_to_rgb_uint8
from rep_medsam_jax.io.intensity import hu_note
from rep_medsam_jax.io.labels import integer_labels
from rep_medsam_jax.io.nifti import load_nifti, model_volume, scalar_volume
from rep_medsam_jax.io.npz import challenge_image, read_npz, require
from rep_medsam_jax.io.orientation import boxes_voxel_to_dhw, dhw_to_volume, header_zooms
from rep_medsam_jax.io.sidecar import Sidecar, sidecar_or_none, sidecar_path

OutputFormat = Literal["npz", "nifti", "png"]


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
# Discovery
# --------------------------------------------------------------------------------------------

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
        (p.is_file() and matching_suffix(p)) or (p.is_dir() and dicom.series_files(p)))]
    return sorted(found, key=lambda p: p.name)


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

def _read_npz(path: Path, boxes_override: Any | None) -> Case:
    name = case_name(path)
    is_3d = is_3d_name(name)
    where = str(path)
    arrays, keys = read_npz(path, ("imgs", "boxes", "spacing"))
    image = challenge_image(require(arrays, keys, "imgs", path, "the image"), is_3d, where)
    spatial = image.shape if is_3d else image.shape[:2]
    if boxes_override is not None:
        boxes = boxes_override
    elif "boxes" in arrays:
        boxes = arrays["boxes"]
    else:
        raise MissingBoxesError(f"{where}: missing key 'boxes' and no boxes were given")
    boxes = validate_boxes(boxes, spatial, where, clip_depth=is_3d)
    spacing = arrays.get("spacing")
    if spacing is not None:
        spacing = validate_spacing(spacing, where)
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
    nifti = load_nifti(path)
    return _volume_case(path, nifti.data, nifti.affine, nifti.header, nifti.image_class, suffix,
                        sidecar_or_none(path), boxes_override, modality, ct_window)


def _volume_case(path: Path, data: np.ndarray, affine: np.ndarray, header: Any,
                 image_class: type, output_suffix: str, sidecar: Sidecar | None,
                 boxes_override: Any | None, modality: str | None,
                 ct_window: tuple[float, float] | None) -> Case:
    """A 3D case from a stored voxel grid (X, Y, Z[, 1...]) and its NIfTI geometry (NIfTI files
    and DICOM series): reoriented to LPS (D, H, W), intensities to uint8, boxes mapped."""
    where = str(path)
    file_shape = tuple(data.shape)
    volume = scalar_volume(data, where)
    modality = modality or (sidecar.modality if sidecar else None)
    ct_window = ct_window or (sidecar.ct_window if sidecar else None)
    image, file_to_lps = model_volume(volume, affine, modality, ct_window)

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
                nifti=geometry, output_suffix=output_suffix, notes=hu_note(volume, modality))


def _read_image(path: Path, boxes_override: Any | None, modality: str | None = None,
                ct_window: tuple[float, float] | None = None) -> Case:
    """A 2D case from a PNG / JPEG, or a single-frame DICOM file (output: a PNG label map)."""
    sidecar = sidecar_or_none(path)
    if path.name.lower().endswith(dicom.DICOM_SUFFIX):
        image = dicom.read_dicom_image(path, modality or (sidecar.modality if sidecar else None),
                                       ct_window or (sidecar.ct_window if sidecar else None))
    else:
        image = decode_image(path)
    image = image_to_rgb_uint8(image, str(path))
    boxes = validate_boxes(_boxes_from_sidecar_or_override(path, sidecar, boxes_override),
                           image.shape[:2], str(path))
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
    suffix = matching_suffix(path)
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
    sidecar = sidecar_or_none(folder)
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
    if not (np.issubdtype(segs.dtype, np.integer) or segs.dtype == np.bool_):
        raise SegmentationError(f"{where}: label map must hold integers, got {segs.dtype}")
    return integer_labels(segs, where, error=SegmentationError)


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
