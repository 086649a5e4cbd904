"""The 2D and 3D inference procedures of ``CVPR24_LiteMedSAM_infer.py``, with its bugs fixed.

Deliberate differences from ``CVPR24_LiteMedSAM_infer.py`` (see docs/differences.md):

* 3D: the downward propagation includes slice 0 when a box starts at z = 0 (the baseline script
  stopped at slice 1);
* 3D: a box whose z range runs past the volume is clipped to it instead of crashing the
  embedding loop;
* 3D: the box taken from the previous slice's mask is clipped to 255, the last pixel of the
  256 x 256 frame (the reference clipped to 256);
* the output uses uint16 when there are 256 or more boxes (uint8 would wrap labels around);
* speed, same results: every slice is encoded once however many boxes touch it, slices are
  encoded in batches, the boxes of a 2D image are decoded in batches, and in 3D every box that
  passes through a slice is decoded in one call on that slice's embedding (an upward sweep
  over z, then a downward one; each box still prompts from its own previous mask, and labels
  are painted as if box after box).

Everything here is NumPy: the ONNX path never imports JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from rep_medsam_jax.postprocess import label_dtype, logits_to_mask, paint_logits
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
    segs = np.zeros((height, width), label_dtype(len(boxes256)))
    for start, logits, _ in _decoded_chunks(backend, embedding, boxes256):
        # Painted chunk after chunk, box after box: later boxes win, as in the reference.
        paint_logits(segs, logits, range(start + 1, start + 1 + len(logits)), new_hw)
    return segs


def _decoded_chunks(backend: Backend, embedding: np.ndarray, prompts: np.ndarray
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """N prompts (N, 4) on one image embedding, DECODE_CHUNK per call -> (index of the chunk's
    first prompt, its (n, S, S) low-resolution logits, its (n,) IoU scores) for each chunk."""
    for start in range(0, len(prompts), DECODE_CHUNK):
        logits, iou = backend.decode(embedding, prompts[start:start + DECODE_CHUNK])
        yield start, logits, iou


def decode_boxes(backend: Backend, embedding: np.ndarray, prompts: np.ndarray,
                 new_hw: tuple[int, int], original_hw: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """N prompts (N, 4) in the S x S frame on one image embedding (1, h, w, C) ->
    ((N, H, W) bool masks, (N,) float32 predicted IoU scores)."""
    masks = np.zeros((len(prompts), *original_hw), bool)
    scores = np.zeros(len(prompts), np.float32)
    for start, logits, iou in _decoded_chunks(backend, embedding, prompts):
        masks[start:start + len(logits)] = logits_to_mask(logits, new_hw, original_hw)
        scores[start:start + len(logits)] = np.asarray(iou).reshape(-1)
    return masks, scores


def slice_tensor(volume: np.ndarray, z: int, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Slice z of a (D, H, W) uint8 volume as the model's (S, S, 3) input: grey repeated to
    three channels, then :func:`rep_medsam_jax.preprocess.preprocess_image`."""
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
                tensor, self.new_hw = slice_tensor(volume, z, backend.image_size)
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
    """The prompt for the next slice, as the reference's 3D loop makes it: the previous slice's
    mask (painted with its label), INTER_AREA-resized to the S x S frame; its bbox expanded by
    3 px, or the middle-slice box if it vanished."""
    # The reference paints label k into a uint8 map before resizing: keep that value (it decides
    # which thin structures survive INTER_AREA), saturating at 255 for labels past uint8.
    resized = resize_longest_side(mask.astype(np.uint8) * np.uint8(min(label, 255)), size)
    if not np.any(resized > 0):
        return fallback
    return get_bbox256(resized, expand=3, upper=size - 1).astype(np.float32)


class _BoxTrack:
    """One 3D box's propagation state: its label, z range, middle-slice prompt and the prompts
    its last decoded masks give the next slice up and down."""

    def __init__(self, label: int, box: np.ndarray, z_range: tuple[int, int],
                 original_hw: tuple[int, int], size: int):
        self.label = label
        self.z_min, self.z_max = z_range
        middle_box = scale_boxes_to_256(box[[0, 1, 3, 4]][None], original_hw, size)[0]
        self.middle_box = middle_box.astype(np.float32)
        # The reference's middle slice, computed on the unclipped range, then kept inside it.
        z_mid = int((int(box[5]) - int(box[2])) / 2 + int(box[2]))
        self.z_mid = min(max(z_mid, self.z_min), self.z_max)
        self.prompt_up = self.middle_box      # for the next slice up, z + 1
        self.prompt_down = self.middle_box    # for the next slice down, z - 1


def predict_3d(backend: Backend, volume: np.ndarray, boxes: np.ndarray,
               progress: Callable[[int], None] | None = None,
               embeddings: SliceEmbeddings | None = None) -> np.ndarray:
    """One volume and its 3D boxes -> label volume, propagating from each box's middle slice.

    volume: (D, H, W) uint8. boxes: (N, 6) [x0, y0, z0, x1, y1, z1] in voxels, z closed.
    Returns (D, H, W) uint8 (uint16 when N >= 256); later boxes win where masks overlap.

    Same result as propagating box after box (as the reference does), but the boxes share
    slices: an upward sweep decodes at each slice z, in one call, every box whose middle slice
    is z (with its middle box) and every box still propagating up through z (with the box from
    its own mask at z - 1); a downward sweep then does the same below the middle slices. Each
    box only ever sees its own masks, so the order of the decodes changes nothing. ``progress``
    is called with each slice index once that slice's decodes of a sweep are done.
    ``embeddings``: slice embeddings already at hand (anything indexable by z with a
    ``new_hw``, such as the interactive segmenter's cache) in place of encoding the slices here.
    """
    depth, height, width = volume.shape
    size = backend.image_size
    boxes = np.asarray(boxes)
    ranges = [clip_box_3d(box, depth) for box in boxes]
    tracks = [_BoxTrack(index + 1, box, z_range, (height, width), size)
              for index, (box, z_range) in enumerate(zip(boxes, ranges))
              if z_range[0] <= z_range[1]]     # a box wholly outside the volume paints nothing
    needed = sorted({z for track in tracks for z in range(track.z_min, track.z_max + 1)})
    if embeddings is None:
        embeddings = SliceEmbeddings(backend, volume, needed)
    segs = np.zeros(volume.shape, np.uint16 if len(boxes) >= 256 else np.uint8)
    if not tracks:
        return segs

    def run(z: int, active: list[_BoxTrack], prompts: list[np.ndarray], upward: bool) -> None:
        masks, _ = decode_boxes(backend, embeddings[z], np.stack(prompts), embeddings.new_hw,
                                (height, width))
        for track, mask in zip(active, masks):
            # Labels grow with the box index, so "later box wins" is "largest label wins":
            # painting with a maximum gives the box-order result whatever the decode order.
            np.maximum(segs[z], np.where(mask, track.label, 0).astype(segs.dtype), out=segs[z])
            next_prompt = _box_from_previous(mask, track.label, track.middle_box, size)
            if z == track.z_mid:               # the middle slice seeds both directions
                track.prompt_up = track.prompt_down = next_prompt
            elif upward:
                track.prompt_up = next_prompt
            else:
                track.prompt_down = next_prompt
        if progress is not None:
            progress(z)

    for z in range(min(t.z_mid for t in tracks), max(t.z_max for t in tracks) + 1):
        active = [t for t in tracks if t.z_mid <= z <= t.z_max]
        if active:
            run(z, active, [t.middle_box if z == t.z_mid else t.prompt_up for t in active],
                upward=True)
    for z in range(max(t.z_mid for t in tracks) - 1, min(t.z_min for t in tracks) - 1, -1):
        active = [t for t in tracks if t.z_min <= z < t.z_mid]   # down to z_min, slice 0 too
        if active:
            run(z, active, [t.prompt_down for t in active], upward=False)
    return segs
