"""Image preprocessing shared by training, inference and dataset building (NumPy + OpenCV).

No JAX here: the CPU deploy path imports this module.

One slice, two model inputs (``CVPR24_LiteMedSAM_infer.py``; MedSAM's ``MedSAM_Inference.py``):

* Student (Rep-MedSAM, 256): the uint8 slice (grey slices repeated to 3 channels) is
  resized so its longest side is 256, keeping the aspect ratio (OpenCV INTER_AREA, sizes
  rounded with int(x + 0.5)); the *resized* image is min-max normalised to [0, 1] with its
  own global min/max; then zero-padded at the bottom/right to 256x256. The valid region
  is the top-left (newh, neww) block, which post-processing crops back out.
* Teacher (MedSAM ViT-B, 1024): the same uint8 slice, 3 channels, is resized straight to
  1024x1024 *without* keeping the aspect ratio (scikit-image order 3, anti-aliased), then
  min-max normalised. For a non-square slice the two inputs are therefore not spatially
  aligned: student embedding cell (i, j) covers a different image region from teacher
  cell (i, j). `teacher_input(..., keep_aspect=True)` instead resizes the longest side to
  1024 and pads bottom/right like the student, so both 64x64 embedding grids cover the
  same region of the slice (a deliberate fix, off by default to match the reference).

Boxes go from original pixels to the 256 frame by multiplying with 256 / max(H, W) and
truncating (`scale_boxes_to_256`).
"""

from __future__ import annotations

import cv2
import numpy as np

STUDENT_SIZE = 256
TEACHER_SIZE = 1024
MINMAX_EPS = 1e-8


def longest_side_size(original_hw: tuple[int, int], target: int = STUDENT_SIZE) -> tuple[int, int]:
    """(newh, neww) after scaling the longest side of (H, W) to `target`, rounded int(x + 0.5)."""
    height, width = original_hw
    scale = target * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: np.ndarray, target: int = STUDENT_SIZE) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (newh, neww[, C]) uint8, OpenCV INTER_AREA.

    INTER_AREA averages pixel areas when shrinking and is linear-like when enlarging;
    OpenCV is kept (rather than reimplemented) to match the reference bit for bit.
    """
    newh, neww = longest_side_size(image.shape[:2], target)
    return cv2.resize(image, (neww, newh), interpolation=cv2.INTER_AREA)


def normalize_minmax(image: np.ndarray) -> np.ndarray:
    """Any shape -> float32 in [0, 1]: (x - min) / max(max - min, 1e-8), global over channels.

    Computed in float64 like the reference, returned as float32.
    """
    values = np.asarray(image, dtype=np.float64)
    low = values.min()
    span = max(values.max() - low, MINMAX_EPS)
    return ((values - low) / span).astype(np.float32)


def pad_to_square(image: np.ndarray, size: int = STUDENT_SIZE) -> np.ndarray:
    """(h, w[, C]) -> (size, size[, C]): zero padding at the bottom and right."""
    height, width = image.shape[:2]
    if height > size or width > size:
        raise ValueError(f"image {image.shape[:2]} larger than {size}x{size}")
    padding = [(0, size - height), (0, size - width)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, padding)


def to_three_channels(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3) by repetition; (H, W, 3) unchanged."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise ValueError(f"expected (H, W) or (H, W, 3) image, got shape {image.shape}")


def preprocess_image(image: np.ndarray, size: int = STUDENT_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """Student input for one image or slice (``CVPR24_LiteMedSAM_infer.py``; NHWC, no batch).

    image: (H, W, 3) or (H, W) uint8.
    Returns ((size, size, 3) float32 in [0, 1], (newh, neww)), the second being the
    extent of the valid (unpadded) region.
    """
    resized = resize_longest_side(to_three_channels(image), size)
    newh, neww = resized.shape[:2]
    return pad_to_square(normalize_minmax(resized), size), (newh, neww)


def scale_boxes_to_256(boxes: np.ndarray, original_hw: tuple[int, int],
                       size: int = STUDENT_SIZE) -> np.ndarray:
    """(N, 4) [x_min, y_min, x_max, y_max] in original pixels -> (N, 4) int64 in the 256 frame.

    Each coordinate is multiplied by 256 / max(H, W) and truncated toward zero, like the
    reference's int(). Works on any array shape (elementwise).
    """
    ratio = size / max(original_hw)
    return np.trunc(np.asarray(boxes, dtype=np.float64) * ratio).astype(np.int64)


def get_bbox256(mask256: np.ndarray, expand: int = 3, upper: int = STUDENT_SIZE - 1) -> np.ndarray:
    """Box [x_min, y_min, x_max, y_max] (int64) around the non-zero pixels of a 2-D mask.

    Used by 3D propagation (``CVPR24_LiteMedSAM_infer.py``): the previous slice's mask,
    resized and padded to 256x256, gives the next slice's box, widened by `expand` pixels on
    every side and clipped to [0, upper]. The reference clips to 256 (one past the last pixel); the
    default 255 keeps the box on the image. Pass upper=256 to reproduce the reference.
    Raises ValueError for an empty mask (the caller falls back to the middle-slice box).
    """
    rows, cols = np.nonzero(mask256 > 0)
    if rows.size == 0:
        raise ValueError("empty mask has no bounding box")
    return np.array([
        max(0, int(cols.min()) - expand),
        max(0, int(rows.min()) - expand),
        min(upper, int(cols.max()) + expand),
        min(upper, int(rows.max()) + expand),
    ], dtype=np.int64)


# ---------------------------------------------------------------------------
# Building npz files from raw volumes (Rep-MedSAM's ``pre_CT_MR.py``)
# ---------------------------------------------------------------------------


DEFAULT_CT_WINDOW = (40.0, 400.0)      # (level, width) in HU: pre_CT_MR.py's CLI defaults
PERCENTILES = (0.5, 99.5)


def _clip_min_max_to_uint8(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """clip(volume, low, high), then min-max the clipped values to 0..255, truncated to uint8.

    The min-max range is the clipped volume's own (as the reference computes it), found from the
    volume's extremes without a clipped copy; the arithmetic is float64 one slice (axis-0 entry)
    at a time, so a 512 x 512 x 300 CT needs no float64 copy of the whole volume.
    """
    volume = np.asarray(volume)
    out = np.zeros(volume.shape, np.uint8)
    if volume.size == 0:
        return out
    lowest = float(np.clip(volume.min(), low, high))
    highest = float(np.clip(volume.max(), low, high))
    if highest <= lowest:            # constant after clipping: all zeros
        return out
    for index in range(volume.shape[0]) if volume.ndim > 1 else [slice(None)]:
        chunk = np.clip(volume[index].astype(np.float64), lowest, highest)
        out[index] = ((chunk - lowest) / (highest - lowest) * 255.0).astype(np.uint8)
    return out


def min_max_to_uint8(volume: np.ndarray) -> np.ndarray:
    """Min-max to 0..255, truncated to uint8 (``pre_grey_rgb.py``'s rule for > 8-bit images)."""
    volume = np.asarray(volume)
    return _clip_min_max_to_uint8(volume, float(volume.min()), float(volume.max()))


def window_ct(volume: np.ndarray, level: float = DEFAULT_CT_WINDOW[0],
              width: float = DEFAULT_CT_WINDOW[1]) -> np.ndarray:
    """HU volume -> uint8: clip to [level - width/2, level + width/2], min-max the clipped volume.

    Same shape in and out. As ``pre_CT_MR.py``, the min-max uses the clipped volume's own range.
    """
    return _clip_min_max_to_uint8(volume, level - width / 2.0, level + width / 2.0)


def percentile_to_uint8(volume: np.ndarray,
                        percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """MR / other volume -> uint8 (``pre_CT_MR.py``'s non-CT rule).

    Clip to the given percentiles of the voxels > 0 (all voxels when none is > 0), min-max to
    0..255, set voxels that were exactly 0 back to 0, truncate to uint8. Same shape in and out.
    """
    volume = np.asarray(volume)
    positive = volume[volume > 0]
    sample = positive if positive.size else volume.ravel()
    low, high = np.percentile(sample, percentiles)
    result = _clip_min_max_to_uint8(volume, float(low), float(high))
    result[volume == 0] = 0
    return result


def teacher_input(image: np.ndarray, size: int = TEACHER_SIZE, keep_aspect: bool = False) -> np.ndarray:
    """Teacher (MedSAM ViT-B) input for one slice: (H, W) or (H, W, 3) uint8 -> (size, size, 3) float32.

    keep_aspect=False (MedSAM's preprocessing): resize straight to size x size (scikit-image
    order 3, anti-aliased, range preserved), then min-max to [0, 1].
    keep_aspect=True: resize the longest side to `size` (same interpolation, sizes rounded
    int(x + 0.5)), min-max, zero-pad bottom/right, so the teacher's 64x64 embedding grid
    lines up with the student's (see the module docstring).
    """
    from skimage import transform  # training-only dependency, kept off the deploy import path

    rgb = to_three_channels(image)
    if keep_aspect:
        out_hw = longest_side_size(rgb.shape[:2], size)
    else:
        out_hw = (size, size)
    resized = transform.resize(rgb, out_hw + (3,), order=3, mode="constant",
                               preserve_range=True, anti_aliasing=True)
    return pad_to_square(normalize_minmax(resized), size)
