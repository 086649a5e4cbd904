"""One case -> its 2D training examples at S x S (S = 256), with the shared preprocessing.

Each axial slice with foreground (a 2D case is one slice) is turned into the student's input by
the same functions inference uses (:mod:`rep_medsam_jax.preprocess`): repeated to three
channels, its longest side resized to S with OpenCV INTER_AREA (sizes rounded int(x + 0.5)).
That resized **uint8** image is stored zero-padded to S x S together with its valid extent
``image_hw = (newh, neww)``; :func:`student_image` later min-max normalises the valid region and
pads with zeros, which gives bit for bit what ``preprocess_image`` gives for the original slice
(storing uint8 instead of float32 keeps the dataset four times smaller).

Each object (label value k present on the slice) gives one example: the slice's label map
resized with nearest-neighbour interpolation to (newh, neww) (as LiteMedSAM's training dataset
does) and padded, then ``mask = labels == k``; its box is the mask's tight box. An object too
small to survive the resize (fewer than ``min_mask_pixels`` pixels at S) is dropped and noted.
Slices that are constant (no contrast to learn from) are skipped and noted.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from input_pipeline.augment import box_from_mask
from input_pipeline.sources import TrainingCase
from rep_medsam_jax.preprocess import (STUDENT_SIZE, normalize_minmax, pad_to_square,
                                       resize_longest_side)


@dataclasses.dataclass(eq=False)
class CaseExamples:
    """The examples of one case; each slice's image is stored once, shared by its objects.

    images: (N_slices, S, S, 3) uint8, resized slice zero-padded bottom/right.
    image_hw: (N_slices, 2) int32, the valid (newh, neww) of each image.
    slice_index: (N_slices,) int32, the slice's index in the case (0 for 2D).
    example_slice: (N_examples,) int32, row of ``images`` each example uses.
    masks: (N_examples, S, S) uint8 {0, 1}.
    boxes: (N_examples, 4) int32 [x_min, y_min, x_max, y_max] inclusive, in the S frame.
    labels: (N_examples,) int32, the object's label value in the case's label map.
    notes: what was dropped and why (human-readable).
    """

    case_id: str
    modality: str
    images: np.ndarray
    image_hw: np.ndarray
    slice_index: np.ndarray
    example_slice: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])


def resize_labels(labels: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 / uint16 label map -> (newh, neww), nearest neighbour (OpenCV)."""
    newh, neww = new_hw
    return cv2.resize(labels, (neww, newh), interpolation=cv2.INTER_NEAREST)


def make_case_examples(case: TrainingCase, size: int = STUDENT_SIZE,
                       min_mask_pixels: int = 1) -> CaseExamples:
    """All per-slice, per-object examples of ``case`` (see the module docstring)."""
    images, image_hw, slice_index = [], [], []
    example_slice, masks, boxes, labels = [], [], [], []
    notes: list[str] = []
    constant_slices, vanished = [], []
    for index in case.foreground_slices():
        rgb, slice_labels = case.slice(int(index))
        if rgb.min() == rgb.max():
            constant_slices.append(int(index))
            continue
        resized = resize_longest_side(rgb, size)
        new_hw = resized.shape[:2]
        small_labels = pad_to_square(resize_labels(slice_labels, new_hw), size)
        present = np.unique(slice_labels)
        row = len(images)
        kept = 0
        for value in present[present > 0]:
            mask = (small_labels == value).astype(np.uint8)
            if int(mask.sum()) < min_mask_pixels:
                vanished.append((int(index), int(value)))
                continue
            example_slice.append(row)
            masks.append(mask)
            boxes.append(box_from_mask(mask))
            labels.append(int(value))
            kept += 1
        if kept:
            images.append(pad_to_square(resized, size))
            image_hw.append(new_hw)
            slice_index.append(int(index))
    if constant_slices:
        notes.append(f"skipped {len(constant_slices)} constant slice(s) with labels: "
                     f"{_short_list(constant_slices)}")
    if vanished:
        notes.append(f"dropped {len(vanished)} object(s) smaller than {min_mask_pixels} pixel(s)"
                     f" at {size}x{size} as (slice, label): {_short_list(vanished)}")
    return CaseExamples(
        case_id=case.case_id, modality=case.modality,
        images=np.asarray(images, np.uint8).reshape(-1, size, size, 3),
        image_hw=np.asarray(image_hw, np.int32).reshape(-1, 2),
        slice_index=np.asarray(slice_index, np.int32),
        example_slice=np.asarray(example_slice, np.int32),
        masks=np.asarray(masks, np.uint8).reshape(-1, size, size),
        boxes=np.asarray(boxes, np.int32).reshape(-1, 4),
        labels=np.asarray(labels, np.int32),
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
