"""An open image or volume in the app: its case, the masks drawn on it, undo, and saving.

NumPy and :mod:`rep_medsam_jax.io` only. A document holds one mask per (label, slice) that has
one; the label map paints labels in increasing order, so where two objects overlap the larger
label wins, as ``rep-medsam predict`` paints box k + 1 over box k.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from rep_medsam_jax.io import BoxShapeError, Case, read_case, write_segmentation

MAX_LABEL = 255                       # the page shows label slices as 8-bit PNGs
SAVE_FORMATS = ("nifti", "png", "npz")
# The placeholder box read_case needs: the app draws its own boxes. A 2D case takes the first,
# a 3D one (NIfTI, DICOM series, 3D npz) rejects it by shape and takes the second.
_PLACEHOLDER_BOXES = ([[0, 0, 0, 0]], [[0, 0, 0, 0, 0, 0]])

# CT windows (level, width) in HU. Soft tissue is predict's default window.
CT_PRESETS = {"soft tissue": (40.0, 400.0), "lung": (-600.0, 1500.0),
              "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}


def read_for_viewing(path: Path, modality: str | None = None,
                     ct_window: tuple[float, float] | None = None) -> Case:
    """A case read as ``predict`` reads it (same intensities, orientation, geometry), without
    needing its boxes. Raises the reader's CaseError for a bad file."""
    # Volumes are tried as 3D first, so that a large series is not read twice.
    looks_3d = path.is_dir() or path.name.lower().endswith((".nii", ".nii.gz")) \
        or path.name.startswith("3D")
    for boxes in _PLACEHOLDER_BOXES[::-1] if looks_3d else _PLACEHOLDER_BOXES:
        try:
            return read_case(path, boxes_override=boxes, modality=modality, ct_window=ct_window)
        except BoxShapeError:
            continue
    raise BoxShapeError(f"{path}: neither a 2D nor a 3D case")


@dataclasses.dataclass
class Document:
    """One opened case. ``masks[label][z]`` is a (H, W) bool mask (z = 0 for a 2D image)."""

    id: str
    case: Case
    uploaded: bool = False
    modality: str | None = None
    ct_window: tuple[float, float] | None = None
    masks: dict[int, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)
    # Undo steps, newest last: each the (label, z, previous mask or None) it replaced.
    history: list[list[tuple[int, int, np.ndarray | None]]] = dataclasses.field(
        default_factory=list)

    @property
    def is_3d(self) -> bool:
        return self.case.is_3d

    @property
    def depth(self) -> int:
        return self.case.image.shape[0] if self.is_3d else 1

    @property
    def hw(self) -> tuple[int, int]:
        return tuple(self.case.spatial_shape[-2:])

    @property
    def can_window(self) -> bool:
        """NIfTI, DICOM series and DICOM files carry intensities a CT window applies to."""
        source = self.case.source
        return self.case.nifti is not None or source.name.lower().endswith(".dcm")

    def slice_pixels(self, z: int) -> np.ndarray:
        """(H, W) uint8 slice of a volume, or the (H, W, 3) image."""
        self._check_slice(z)
        return self.case.image[z] if self.is_3d else self.case.image

    def _check_slice(self, z: int) -> None:
        if not 0 <= z < self.depth:
            raise ValueError(f"slice {z} outside 0..{self.depth - 1}")

    @staticmethod
    def check_label(label: int) -> int:
        label = int(label)
        if not 1 <= label <= MAX_LABEL:
            raise ValueError(f"label {label} outside 1..{MAX_LABEL}")
        return label

    # ---- edits (each one undo step) ----------------------------------------------------------

    def set_masks(self, label: int, masks: dict[int, np.ndarray]) -> None:
        """Replace ``label``'s masks on the given slices (an empty mask removes it there)."""
        label = self.check_label(label)
        for z in masks:
            self._check_slice(z)
        step = []
        slices = self.masks.setdefault(label, {})
        for z, mask in masks.items():
            step.append((label, z, slices.get(z)))
            if mask.any():
                slices[z] = np.asarray(mask, bool)
            else:
                slices.pop(z, None)
        self._record(step)

    def delete(self, label: int, z: int | None = None) -> None:
        """Remove ``label`` on slice z, or everywhere when z is None."""
        label = self.check_label(label)
        slices = self.masks.get(label, {})
        chosen = list(slices) if z is None else [z] if z in slices else []
        self._record([(label, s, slices.pop(s)) for s in chosen])

    def undo(self) -> bool:
        """Revert the last edit; False when there is none."""
        if not self.history:
            return False
        for label, z, previous in reversed(self.history.pop()):
            slices = self.masks.setdefault(label, {})
            if previous is None:
                slices.pop(z, None)
            else:
                slices[z] = previous
        return True

    def _record(self, step: list) -> None:
        if step:
            self.history.append(step)

    # ---- label maps --------------------------------------------------------------------------

    def label_slice(self, z: int) -> np.ndarray:
        """(H, W) uint8 labels of slice z, larger labels painted over smaller ones."""
        self._check_slice(z)
        painted = np.zeros(self.hw, np.uint8)
        for label in sorted(self.masks):
            mask = self.masks[label].get(z)
            if mask is not None:
                painted[mask] = label
        return painted

    def label_map(self) -> np.ndarray:
        """The whole label map: (D, H, W) for a volume, (H, W) for an image."""
        if not self.is_3d:
            return self.label_slice(0)
        return np.stack([self.label_slice(z) for z in range(self.depth)])

    def labels_used(self) -> list[int]:
        return sorted(label for label, slices in self.masks.items() if slices)

    # ---- saving ------------------------------------------------------------------------------

    def save_formats(self) -> list[str]:
        """nifti for NIfTI / DICOM series inputs (their geometry), png for images, npz always."""
        formats = []
        if self.case.nifti is not None:
            formats.append("nifti")
        if not self.is_3d:
            formats.append("png")
        return formats + ["npz"]

    def output_case(self, fmt: str) -> Case:
        """The case to write in ``fmt``: named ``<name>_seg`` so an input is never replaced."""
        if fmt not in self.save_formats():
            raise ValueError(f"cannot save {self.case.name} as {fmt!r}: choose one of "
                             f"{', '.join(self.save_formats())}")
        case = dataclasses.replace(self.case, name=self.case.name + "_seg")
        if fmt == "npz":
            return dataclasses.replace(case, output_format="npz", output_suffix=".npz")
        if fmt == "png":
            return dataclasses.replace(case, output_format="png", output_suffix=".png")
        return case             # nifti: the input's own suffix (.nii / .nii.gz) and geometry

    def save_beside(self, fmt: str) -> Path:
        """Write the label map next to the input (atomically); returns the written path."""
        if self.uploaded:
            raise ValueError("an uploaded file has no folder to save beside: download it")
        return write_segmentation(self.output_case(fmt), self.label_map(),
                                  self.case.source.parent)

    def save_bytes(self, fmt: str) -> tuple[str, bytes]:
        """(file name, file content) of the label map in ``fmt``, for a download."""
        case = self.output_case(fmt)
        with tempfile.TemporaryDirectory(prefix="rep_medsam_save_") as folder:
            path = write_segmentation(case, self.label_map(), folder)
            return path.name, path.read_bytes()
