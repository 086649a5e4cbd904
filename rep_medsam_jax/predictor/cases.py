"""The 2D and 3D inference procedures of SPEC §7, with the reference bugs of §10 fixed.

Deliberate differences from ``CVPR24_LiteMedSAM_infer.py`` (see docs/differences.md):

* 3D: the downward propagation includes slice 0 when a box starts at z = 0 (the baseline script
  stopped at slice 1);
* 3D: a box whose z range runs past the volume is clipped to it instead of crashing the
  embedding loop;
* 3D: the box taken from the previous slice's mask is clipped to 255, the last pixel of the
  256 x 256 frame (the reference clipped to 256);
* the output uses uint16 when there are 256 or more boxes (uint8 would wrap labels around);
* speed, same results: every slice is encoded once however many boxes touch it, slices are
  encoded in batches, and the boxes of a 2D image are decoded in batches.

Everything here is NumPy: the ONNX path never imports JAX.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rep_medsam_jax.postprocess import logits_to_mask, paint_labels
from rep_medsam_jax.predictor.backend import Backend
from rep_medsam_jax.preprocess import (get_bbox256, preprocess_image, resize_longest_side,
                                       scale_boxes_to_256)

DECODE_CHUNK = 16       # boxes decoded per call: bounds memory for images with many boxes
ENCODE_CHUNK = 4        # slices encoded per call


def predict_2d(backend: Backend, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """One image and its boxes -> label map.

    image: (H, W, 3) uint8. boxes: (N, 4) [x0, y0, x1, y1] in original pixels.
    Returns (H, W) uint8 (uint16 when N >= 256): 0 background, k the k-th box (1-based);
    later boxes overwrite earlier ones where masks overlap.
    """
    height, width = image.shape[:2]
    size = backend.image_size
    tensor, new_hw = preprocess_image(image, size)
    embedding = backend.encode(tensor[None])
    boxes256 = scale_boxes_to_256(np.asarray(boxes)[:, :4], (height, width), size)
    boxes256 = boxes256.astype(np.float32)
    masks = np.zeros((len(boxes256), height, width), bool)
    for start in range(0, len(boxes256), DECODE_CHUNK):
        logits, _ = backend.decode(embedding, boxes256[start:start + DECODE_CHUNK])
        masks[start:start + DECODE_CHUNK] = logits_to_mask(logits, new_hw, (height, width))
    return paint_labels(masks, np.arange(1, len(boxes256) + 1), (height, width))


def _slice_tensor(volume: np.ndarray, z: int, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Slice z of a (D, H, W) uint8 volume as the model's (S, S, 3) input (SPEC §6.4)."""
    return preprocess_image(np.repeat(volume[z][:, :, None], 3, axis=-1), size)


def clip_box_3d(box: np.ndarray, depth: int) -> tuple[int, int]:
    """The closed z range of a 3D box, clipped to the volume (reference bug fix)."""
    z_min = max(int(box[2]), 0)
    z_max = min(int(box[5]), depth - 1)
    return z_min, z_max


class SliceEmbeddings:
    """Encodes each needed slice of a volume once, in batches, and keeps the embeddings."""

    def __init__(self, backend: Backend, volume: np.ndarray, slices: list[int]):
        self._cache: dict[int, np.ndarray] = {}
        self.new_hw: tuple[int, int] | None = None
        for start in range(0, len(slices), ENCODE_CHUNK):
            chunk = slices[start:start + ENCODE_CHUNK]
            tensors = []
            for z in chunk:
                tensor, self.new_hw = _slice_tensor(volume, z, backend.image_size)
                tensors.append(tensor)
            embeddings = backend.encode(np.stack(tensors))
            for z, embedding in zip(chunk, embeddings):
                self._cache[z] = embedding[None]

    def __getitem__(self, z: int) -> np.ndarray:
        return self._cache[z]

    def __len__(self) -> int:
        return len(self._cache)


def _box_from_previous(mask: np.ndarray, label: int, fallback: np.ndarray,
                       size: int) -> np.ndarray:
    """SPEC §7.3: the previous slice's mask (painted with its label), INTER_AREA-resized to the
    S x S frame; its bbox expanded by 3 px, or the middle-slice box if it vanished."""
    # The reference paints label k into a uint8 map before resizing: keep that value (it decides
    # which thin structures survive INTER_AREA), saturating at 255 for labels past uint8.
    resized = resize_longest_side(mask.astype(np.uint8) * np.uint8(min(label, 255)), size)
    if not np.any(resized > 0):
        return fallback
    return get_bbox256(resized, expand=3, upper=size - 1).astype(np.float32)


def predict_3d(backend: Backend, volume: np.ndarray, boxes: np.ndarray,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
    """One volume and its 3D boxes -> label volume, propagating from each box's middle slice.

    volume: (D, H, W) uint8. boxes: (N, 6) [x0, y0, z0, x1, y1, z1] in voxels, z closed.
    Returns (D, H, W) uint8 (uint16 when N >= 256).
    """
    depth, height, width = volume.shape
    size = backend.image_size
    boxes = np.asarray(boxes)
    ranges = [clip_box_3d(box, depth) for box in boxes]
    needed = sorted({z for z_min, z_max in ranges for z in range(z_min, z_max + 1)})
    embeddings = SliceEmbeddings(backend, volume, needed)
    new_hw = embeddings.new_hw
    segs = np.zeros(volume.shape, np.uint16 if len(boxes) >= 256 else np.uint8)

    for index, (box, (z_min, z_max)) in enumerate(zip(boxes, ranges)):
        label = index + 1
        if z_min > z_max:        # the box lies wholly outside the volume
            continue
        middle_box = scale_boxes_to_256(box[[0, 1, 3, 4]][None], (height, width), size)[0]
        middle_box = middle_box.astype(np.float32)
        z_mid = min(max(int((int(box[5]) - int(box[2])) / 2 + int(box[2])), z_min), z_max)
        masks: dict[int, np.ndarray] = {}

        def segment(z: int, neighbour: int | None) -> None:
            prompt = middle_box if neighbour is None else _box_from_previous(
                masks[neighbour], label, middle_box, size)
            logits, _ = backend.decode(embeddings[z], prompt[None])
            masks[z] = logits_to_mask(logits, new_hw, (height, width))[0]

        segment(z_mid, None)
        for z in range(z_mid + 1, z_max + 1):
            segment(z, z - 1)
        for z in range(z_mid - 1, z_min - 1, -1):     # down to z_min inclusive (slice 0 too)
            segment(z, z + 1)
        for z, mask in masks.items():
            segs[z][mask] = label
        if progress is not None:
            progress(index)
    return segs
