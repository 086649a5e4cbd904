"""Post-processing of decoder logits into label maps (NumPy only, no JAX).

Per box, as in the authors' `CVPR24_LiteMedSAM_infer.py`: the (256, 256) low-resolution
logits are cropped to the valid (newh, neww) block, resized bilinearly to the original
(H, W) with PyTorch's `interpolate(mode="bilinear", align_corners=False)` semantics (no
antialiasing, also when shrinking), rounded as PyTorch's CPU kernel rounds, and thresholded as the reference's float32
``sigmoid(x) > 0.5``, which holds exactly for x > ``SIGMOID_HALF_BOUND``. The masks are the
reference's pixel for pixel (tests/test_reference_pipeline.py, 1536 x 2040 with 19 boxes).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np


def _linear_source_indices(in_size: int, out_size: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices and weight of the upper neighbour for 1-D linear resizing.

    PyTorch align_corners=False: src = (dst + 0.5) * in / out - 0.5, clamped at 0 from
    below; lower = floor(src), upper = min(lower + 1, in - 1), weight = src - lower.
    Returns (lower (out,) int, upper (out,) int, upper weight (out,) float32).
    """
    scale = np.float32(in_size) / np.float32(out_size)  # float32 division, as PyTorch does
    # PyTorch evaluates scale * (dst + 0.5) - 0.5 with one rounding (a fused multiply-add);
    # the float64 product of these small operands is exact, so rounding once to float32
    # afterwards reproduces it (a float32 product would round twice: 1-ulp index errors).
    centres = np.arange(out_size, dtype=np.float64) + 0.5
    source = (np.float64(scale) * centres - 0.5).astype(np.float32)
    source = np.maximum(source, np.float32(0.0))
    lower = np.minimum(source.astype(np.int64), in_size - 1)  # trunc == floor, source >= 0
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, (source - lower).astype(np.float32)


Neighbours = tuple[np.ndarray, np.ndarray, np.ndarray]   # from _linear_source_indices

# PyTorch's float32 sigmoid(x) > 0.5 holds exactly for x > 3 * 2**-24 / 2 (8.94e-8): below it
# the sigmoid rounds to 0.5 (checked for torch 2.13 on x86-64 with its AVX512, AVX2 and default
# CPU kernels). A threshold at 0 instead marks the pixels whose resized logit lies in
# (0, 8.94e-8] that the reference leaves out: on 1536 x 2040 images with 19 boxes, a few per
# image, the near-zero values being common where an 8x upsampling crosses a mask boundary.
SIGMOID_HALF_BOUND = np.float32(3 * 2.0 ** -25)


def _weighted_sum(lower: np.ndarray, lower_weight: np.ndarray, upper: np.ndarray,
                  upper_weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """lower * lower_weight + upper * upper_weight (float32, broadcast) rounded as PyTorch's CPU
    bilinear kernel rounds it: the upper product rounded to float32, then one fused
    multiply-add (the lower product is not rounded). Emulated in float64, where the product of
    two float32 numbers is exact; a plain float32 sum is 1 ulp off for about a third of the
    pixels, which flips the sign of some near-zero logits. out: float64 scratch of the
    result's shape, or None. Returns float32."""
    total = np.multiply(lower, lower_weight, out=out, dtype=np.float64)
    total += np.multiply(upper, upper_weight)
    return total.astype(np.float32)


def _blend_columns(images: np.ndarray, cols: Neighbours) -> np.ndarray:
    """The width half of the blend: images (..., w) float32 -> (..., len(cols[0])) float32."""
    col_lo, col_hi, col_weight = cols
    # np.take is markedly faster than fancy indexing for these gathers.
    return _weighted_sum(np.take(images, col_lo, axis=-1), np.float32(1.0) - col_weight,
                         np.take(images, col_hi, axis=-1), col_weight)


def _blend(images: np.ndarray, rows: Neighbours, cols: Neighbours) -> np.ndarray:
    """The bilinear blend at the given source indices: images (N, h, w) float32, rows and cols
    (lower, upper, upper weight) from ``_linear_source_indices`` (or slices of them)
    -> (N, len(rows[0]), len(cols[0])) float32.

    Separable: columns first, then rows (PyTorch's CPU kernel blends along the width inside the
    height blend, so this order rounds the same way), each a gather of the two neighbours and a
    blend in float32.
    """
    row_lo, row_hi, row_weight = rows
    columns = _blend_columns(images, cols)
    row_weight = row_weight[:, None]
    return _weighted_sum(np.take(columns, row_lo, axis=-2), np.float32(1.0) - row_weight,
                         np.take(columns, row_hi, axis=-2), row_weight)


def resize_bilinear(images: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(N, h, w) float -> (N, H, W) float32, bilinear, align_corners=False, no antialias."""
    images = np.asarray(images, dtype=np.float32)
    return _blend(images, _linear_source_indices(images.shape[1], out_hw[0]),
                  _linear_source_indices(images.shape[2], out_hw[1]))


def _reach(lower: np.ndarray, upper: np.ndarray, first: int, last: int) -> slice:
    """The output indices with a source neighbour in [first, last]: lower and upper (the two
    neighbours of each output index) never decrease, so those indices are one range."""
    return slice(int(np.searchsorted(upper, first, side="left")),
                 int(np.searchsorted(lower, last, side="right")))


def _positive_window(logits: np.ndarray, rows: Neighbours, cols: Neighbours
                     ) -> tuple[slice, slice] | None:
    """The output rows and columns whose blend can be > 0: an output pixel blends its source
    neighbours with weights >= 0, so it is > 0 only if one of them is. (h, w) logits -> the
    window reached by the bounding box of the positive logits, or None if there are none."""
    positive = logits > 0
    hit_rows = np.flatnonzero(positive.any(axis=1))
    if hit_rows.size == 0:
        return None
    hit_cols = np.flatnonzero(positive.any(axis=0))
    return (_reach(rows[0], rows[1], hit_rows[0], hit_rows[-1]),
            _reach(cols[0], cols[1], hit_cols[0], hit_cols[-1]))


# Output rows blended per step: the step's float32 temporaries (ROW_BLOCK x W) are made once
# per mask and stay in the cache, where a whole-window blend allocated and faulted in several
# (H x W) float32 arrays per mask (1536 x 2040: 12.5 MB each). 19 masks of 1536 x 2040: 8 rows
# 0.23 s, 16 0.15 s, 32 0.11 s, 64-512 0.09-0.10 s (whole-window blends: 0.26-0.33 s).
ROW_BLOCK = 64


def _paint_where_positive(target: np.ndarray, logits: np.ndarray, rows: Neighbours,
                          cols: Neighbours, window: tuple[slice, slice], value,
                          row_span: range) -> None:
    """target[i, j] = value wherever the bilinear blend of ``logits`` at output (i, j) is
    > ``SIGMOID_HALF_BOUND``, for the output rows i in ``row_span`` and the (row, column)
    ``window``.

    target: (H, W), the whole output frame; logits: (h, w) float32; rows, cols: the source
    neighbours of every output row and column (h -> H, w -> W). The blend is ``_blend``'s
    (the same float32 roundings wherever they decide the sign), one block of rows at a time.
    """
    first = max(window[0].start, row_span.start)
    stop = min(window[0].stop, row_span.stop)
    col_window = window[1]
    if first >= stop or col_window.start >= col_window.stop:
        return
    row_lo, row_hi, row_weight = (a[first:stop] for a in rows)
    base = int(row_lo[0])
    band = logits[base:int(row_hi[-1]) + 1]            # the source rows these outputs read
    columns = _blend_columns(band, tuple(a[col_window] for a in cols))
    row_lo, row_hi = row_lo - base, row_hi - base
    lower_weight = (np.float32(1.0) - row_weight)[:, None]
    upper_weight = row_weight[:, None]
    block = min(ROW_BLOCK, stop - first)
    lower = np.empty((block, columns.shape[1]), np.float32)
    upper = np.empty_like(lower)
    blend = np.empty_like(lower)
    positive = np.empty(lower.shape, bool)
    near = np.empty(lower.shape, bool)
    # The plain float32 blend differs from _weighted_sum's by less than 3 half-ulps of the
    # largest value blended (two roundings against one): only pixels that close to the
    # threshold can fall on the other side, and only they are recomputed the exact way
    # (everywhere in float64 it would take twice as long).
    margin = np.float32(2.0 ** -21) * np.float32(np.abs(columns).max())
    near_zero = margin + SIGMOID_HALF_BOUND
    value = np.asarray(value, dtype=target.dtype)
    for start in range(0, stop - first, block):
        end = min(start + block, stop - first)
        n = end - start
        # mode="clip": the indices are in range, and "raise" would buffer the output.
        np.take(columns, row_lo[start:end], axis=0, out=lower[:n], mode="clip")
        np.take(columns, row_hi[start:end], axis=0, out=upper[:n], mode="clip")
        np.multiply(upper[:n], upper_weight[start:end], out=upper[:n])
        np.multiply(lower[:n], lower_weight[start:end], out=blend[:n])
        np.add(blend[:n], upper[:n], out=blend[:n])
        np.greater(blend[:n], SIGMOID_HALF_BOUND, out=positive[:n])
        # |blend| <= margin + bound covers |blend - bound| <= margin, one pass fewer.
        np.less_equal(np.abs(blend[:n], out=blend[:n]), near_zero, out=near[:n])
        if near[:n].any():
            i, j = np.nonzero(near[:n])
            exact = _weighted_sum(lower[i, j], lower_weight[start + i, 0], upper[i, j], 1.0)
            positive[i, j] = exact > SIGMOID_HALF_BOUND
        np.copyto(target[first + start:first + end, col_window], value, where=positive[:n])


# Below this many output pixels in all (masks x H x W) the masks are resized in the calling
# thread; above it, on every core: NumPy releases the GIL in the gathers and blends, and the
# cores are otherwise idle between two decoder calls (docs/benchmarks.md).
PARALLEL_MIN_PIXELS = 1 << 22


def _workers(requested: int | None, pixels: int) -> int:
    if requested is None:
        return (os.cpu_count() or 1) if pixels >= PARALLEL_MIN_PIXELS else 1
    return max(1, requested)


def _crop(low_res_logits: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    low_res_logits = np.asarray(low_res_logits)
    if low_res_logits.ndim != 3:
        raise ValueError(f"expected (N, 256, 256) logits, got shape {low_res_logits.shape}")
    return np.ascontiguousarray(low_res_logits[:, :new_hw[0], :new_hw[1]], dtype=np.float32)


def logits_to_mask(low_res_logits: np.ndarray, new_hw: tuple[int, int],
                   original_hw: tuple[int, int], workers: int | None = None) -> np.ndarray:
    """(N, 256, 256) logits -> (N, H, W) bool masks at the original image size.

    new_hw: (newh, neww), the valid block of the padded 256x256 input;
    original_hw: (H, W) of the original image or slice;
    workers: threads resizing masks side by side (None: every core for large outputs, else 1).

    Equal to ``resize_bilinear(cropped, original_hw) > SIGMOID_HALF_BOUND``, but computed only
    inside the window of each mask that can be positive (``_positive_window``), with the whole
    image's indices and weights, so the values there are the same; an object is usually a small
    part of a large image (19 cells on a 1536 x 2040 micrograph: 1.5 s to resize the whole
    masks, a few hundredths for the windows).
    """
    cropped = _crop(low_res_logits, new_hw)
    rows = _linear_source_indices(new_hw[0], original_hw[0])
    cols = _linear_source_indices(new_hw[1], original_hw[1])
    masks = np.zeros((len(cropped), *original_hw), bool)
    every_row = range(original_hw[0])

    def resize_one(index: int) -> None:
        window = _positive_window(cropped[index], rows, cols)
        if window is not None:
            _paint_where_positive(masks[index], cropped[index], rows, cols, window, True,
                                  every_row)

    workers = min(_workers(workers, masks.size), max(1, len(cropped)))
    if workers == 1:
        for index in range(len(cropped)):
            resize_one(index)
    else:
        # Each task writes its own mask: no two threads touch the same memory.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(resize_one, range(len(cropped))))
    return masks


def paint_logits(target: np.ndarray, low_res_logits: np.ndarray, labels: Sequence[int],
                 new_hw: tuple[int, int], workers: int | None = None) -> None:
    """Paint N boxes' masks into the label map ``target`` (H, W), in place, box after box.

    Box k's mask is ``logits_to_mask``'s (the same pixels), painted with labels[k]; later boxes
    overwrite earlier ones where masks overlap, as in the reference. Equal to painting
    ``paint_labels(logits_to_mask(...))`` over ``target`` without making the (N, H, W) masks:
    threads take bands of rows, and each paints every box in order within its band.
    """
    cropped = _crop(low_res_logits, new_hw)
    labels = [int(label) for label in labels]
    if len(labels) != len(cropped):
        raise ValueError(f"{len(cropped)} masks but {len(labels)} labels")
    if labels and max(labels) > np.iinfo(target.dtype).max:
        raise ValueError(f"label {max(labels)} does not fit in {target.dtype}")
    height, width = target.shape
    rows = _linear_source_indices(new_hw[0], height)
    cols = _linear_source_indices(new_hw[1], width)
    windows = [_positive_window(logits, rows, cols) for logits in cropped]
    painted = [(logits, window, label)
               for logits, window, label in zip(cropped, windows, labels) if window is not None]
    workers = _workers(workers, len(painted) * target.size)

    def paint_band(span: range) -> None:
        for logits, window, label in painted:
            _paint_where_positive(target, logits, rows, cols, window, label, span)

    if workers == 1:
        paint_band(range(height))
        return
    # A few bands per thread even out masks of different sizes. Bands are disjoint rows: no
    # two threads touch the same memory.
    bounds = np.linspace(0, height, workers * 4 + 1).astype(int)
    bands = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(paint_band, bands))


def label_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned dtype holding labels 0..max_label (uint8, uint16 or uint32)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label {max_label} does not fit in uint32")


def paint_labels(masks: Sequence[np.ndarray] | np.ndarray, labels: Sequence[int],
                 shape: tuple[int, ...], dtype: np.dtype | None = None) -> np.ndarray:
    """Paint boolean masks (N, *shape) into one label map of `shape`, in order.

    Mask k gets labels[k]; later masks overwrite earlier ones where they overlap, as in the
    reference. dtype None picks uint8 when every label is < 256, else uint16 (uint32 past
    65535). The reference always writes uint8, so box 256 would wrap to 0 there; this is a
    deliberate fix (the challenge npz format allows any integer dtype for `segs`).
    """
    labels = [int(label) for label in labels]
    if len(labels) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(labels)} labels")
    if dtype is None:
        dtype = label_dtype(max(labels, default=0))
    painted = np.zeros(shape, dtype=dtype)
    for mask, label in zip(masks, labels):
        painted[np.asarray(mask, dtype=bool)] = label
    return painted
