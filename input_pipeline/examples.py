"""One case -> its 2D training slices at S x S (S = 256), with the shared preprocessing.

Each axial slice with foreground (a 2D case is one slice) is turned into the student's input by
the same functions inference uses (:mod:`rep_medsam_jax.preprocess`): repeated to three
channels, its longest side resized to S with OpenCV INTER_AREA (sizes rounded int(x + 0.5)).
That resized **uint8** image is stored zero-padded to S x S together with its valid extent
``image_hw = (newh, neww)``; :func:`student_image` later min-max normalises the valid region and
pads with zeros, which gives bit for bit what ``preprocess_image`` gives for the original slice
(storing uint8 instead of float32 keeps the dataset four times smaller).

Each slice is stored **once**, with its label map resized with nearest-neighbour interpolation
to (newh, neww) (as LiteMedSAM's training dataset does) and padded. Its objects are the label
values present; the loader draws one of them per slice per epoch (``mask = labels == k``, box =
the mask's tight box), as the reference training scripts do. An object too small to survive the
resize (fewer than ``min_mask_pixels`` pixels at S) is set to background in the stored label
map, so every value left is a usable object; a slice left without objects is dropped. Both are
noted. Slices that are constant (no contrast to learn from) are skipped and noted.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from input_pipeline.sources import TrainingCase
from rep_medsam_jax.preprocess import (STUDENT_SIZE, normalize_minmax, pad_to_square,
                                       resize_longest_side)

LABEL_DTYPE = np.uint16


@dataclasses.dataclass(eq=False)
class CaseSlices:
    """The stored slices of one case, and the objects each holds.

    images: (N_slices, S, S, 3) uint8, resized slice zero-padded bottom/right.
    image_hw: (N_slices, 2) int32, the valid (newh, neww) of each image.
    slice_index: (N_slices,) int32, the slice's index in the case (0 for 2D).
    label_maps: (N_slices, S, S) uint16, resized label map (0 = background and padding).
    object_slice: (N_objects,) int32, row of ``images`` holding each object.
    object_label: (N_objects,) int32, the object's value in its slice's label map.
    notes: what was dropped and why (human-readable).
    """

    case_id: str
    modality: str
    images: np.ndarray
    image_hw: np.ndarray
    slice_index: np.ndarray
    label_maps: np.ndarray
    object_slice: np.ndarray
    object_label: np.ndarray
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_slices(self) -> int:
        return int(self.slice_index.shape[0])

    @property
    def num_objects(self) -> int:
        return int(self.object_label.shape[0])


def resize_labels(labels: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 / uint16 label map -> (newh, neww), nearest neighbour (OpenCV)."""
    newh, neww = new_hw
    return cv2.resize(labels, (neww, newh), interpolation=cv2.INTER_NEAREST)


def slice_objects(label_map: np.ndarray) -> np.ndarray:
    """(S, S) stored label map -> its object values (the nonzero values present), ascending."""
    values = np.unique(label_map)
    return values[values > 0]


def make_case_slices(case: TrainingCase, size: int = STUDENT_SIZE,
                     min_mask_pixels: int = 1) -> CaseSlices:
    """Every usable slice of ``case`` with its objects (see the module docstring)."""
    images, image_hw, slice_index, label_maps = [], [], [], []
    object_slice, object_label = [], []
    notes: list[str] = []
    constant_slices, vanished = [], []
    for index in case.foreground_slices():
        rgb, slice_labels = case.slice(int(index))
        if rgb.min() == rgb.max():
            constant_slices.append(int(index))
            continue
        resized = resize_longest_side(rgb, size)
        new_hw = resized.shape[:2]
        small = pad_to_square(resize_labels(slice_labels.astype(LABEL_DTYPE), new_hw), size)
        present = np.unique(slice_labels)
        kept = []
        for value in present[present > 0]:
            if int(np.count_nonzero(small == value)) < min_mask_pixels:
                vanished.append((int(index), int(value)))
                small[small == value] = 0
            else:
                kept.append(int(value))
        if not kept:
            continue
        row = len(images)
        object_slice.extend([row] * len(kept))
        object_label.extend(kept)
        images.append(pad_to_square(resized, size))
        image_hw.append(new_hw)
        slice_index.append(int(index))
        label_maps.append(small)
    if constant_slices:
        notes.append(f"skipped {len(constant_slices)} constant slice(s) with labels: "
                     f"{_short_list(constant_slices)}")
    if vanished:
        notes.append(f"dropped {len(vanished)} object(s) smaller than {min_mask_pixels} pixel(s)"
                     f" at {size}x{size} as (slice, label): {_short_list(vanished)}")
    return CaseSlices(
        case_id=case.case_id, modality=case.modality,
        images=np.asarray(images, np.uint8).reshape(-1, size, size, 3),
        image_hw=np.asarray(image_hw, np.int32).reshape(-1, 2),
        slice_index=np.asarray(slice_index, np.int32),
        label_maps=np.asarray(label_maps, LABEL_DTYPE).reshape(-1, size, size),
        object_slice=np.asarray(object_slice, np.int32),
        object_label=np.asarray(object_label, np.int32),
        notes=notes)


def _short_list(items: list, limit: int = 8) -> str:
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def student_image(image: np.ndarray, image_hw: np.ndarray) -> np.ndarray:
    """Stored (S, S, 3) uint8 + valid (newh, neww) -> (S, S, 3) float32 student input.

    Min-max over the valid region only, then zero padding: identical to
    ``preprocess_image(original slice)``.
    """
    newh, neww = int(image_hw[0]), int(image_hw[1])
    return pad_to_square(normalize_minmax(image[:newh, :neww]), image.shape[0])


def teacher_source_image(image: np.ndarray, image_hw: np.ndarray) -> np.ndarray:
    """The stored slice's valid region (newh, neww, 3) uint8, from which the teacher's input is
    made (``teacher_input(..., keep_aspect=True)``, see teacher_cache)."""
    newh, neww = int(image_hw[0]), int(image_hw[1])
    return image[:newh, :neww]
