"""Tests for rep_medsam_jax.preprocess and rep_medsam_jax.postprocess.

References: hand-made inputs with hand-computed outputs, and PyTorch's
`torch.nn.functional.interpolate` for the bilinear resize.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from rep_medsam_jax import postprocess, preprocess

# ---------------------------------------------------------------------------
# Student preprocessing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("original_hw, expected_hw", [
    ((480, 560), (219, 256)),   # 480 * 256/560 = 219.43
    ((100, 37), (256, 95)),     # 37 * 2.56 = 94.72, enlarging
    ((512, 5), (256, 3)),       # 2.5 rounds up with int(x + 0.5) (Python round() would give 2)
    ((256, 256), (256, 256)),
    ((1000, 3000), (85, 256)),  # 85.33
])
def test_resize_longest_side_sizes(original_hw, expected_hw):
    assert preprocess.longest_side_size(original_hw) == expected_hw
    image = np.zeros(original_hw + (3,), dtype=np.uint8)
    assert preprocess.resize_longest_side(image).shape == expected_hw + (3,)
    assert preprocess.resize_longest_side(image[..., 0]).shape == expected_hw


def test_resize_longest_side_is_area_average_when_halving():
    rng = np.random.default_rng(0)
    # 2x2 blocks whose sums are multiples of 4, so the block mean is an exact integer
    block_means = rng.integers(1, 250, size=(256, 256))
    offsets = np.array([[1, -1], [-1, 1]])
    image = (np.kron(block_means, np.ones((2, 2), int)) + np.tile(offsets, (256, 256))).astype(np.uint8)
    expected = image.reshape(256, 2, 256, 2).astype(np.int64).sum(axis=(1, 3))
    assert np.all(expected % 4 == 0)
    np.testing.assert_array_equal(preprocess.resize_longest_side(image), expected // 4)


def test_normalize_minmax_global_over_channels():
    image = np.array([[[2, 4, 6]], [[10, 4, 2]]], dtype=np.uint8)  # (2, 1, 3)
    out = preprocess.normalize_minmax(image)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, (image.astype(np.float64) - 2) / 8)
    constant = preprocess.normalize_minmax(np.full((3, 3), 7, np.uint8))
    np.testing.assert_array_equal(constant, np.zeros((3, 3), np.float32))


def test_pad_to_square_bottom_right():
    image = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    padded = preprocess.pad_to_square(image, 4)
    np.testing.assert_array_equal(padded, [[1, 2, 3, 0], [4, 5, 6, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert preprocess.pad_to_square(np.ones((2, 3, 3)), 4).shape == (4, 4, 3)
    with pytest.raises(ValueError):
        preprocess.pad_to_square(np.ones((5, 3)), 4)


def test_preprocess_image_grey_and_rgb():
    rng = np.random.default_rng(1)
    grey = rng.integers(20, 200, size=(120, 80), dtype=np.uint8)
    tensor, (newh, neww) = preprocess.preprocess_image(grey)
    assert tensor.shape == (256, 256, 3) and tensor.dtype == np.float32
    assert (newh, neww) == (256, 171)  # 80 * 256/120 = 170.67
    rgb_tensor, rgb_hw = preprocess.preprocess_image(np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(rgb_tensor, tensor)
    assert rgb_hw == (newh, neww)
    valid = tensor[:newh, :neww]
    assert valid.min() == 0.0 and valid.max() == 1.0  # min-max of the resized image
    assert np.all(tensor[:, neww:] == 0) and np.all(tensor[newh:] == 0)
    # min-max after resizing: the resized image's own extremes map to 0 and 1
    resized = preprocess.resize_longest_side(grey).astype(np.float64)
    expected = (resized - resized.min()) / (resized.max() - resized.min())
    np.testing.assert_allclose(valid[..., 1], expected, atol=1e-7)
    with pytest.raises(ValueError):
        preprocess.preprocess_image(np.zeros((10, 10, 4), np.uint8))


def test_scale_boxes_to_256_truncates():
    boxes = np.array([[10, 20, 559, 479], [0, 0, 1, 1]])
    # ratio 256/560: 4.57 -> 4, 9.14 -> 9, 255.54 -> 255, 218.97 -> 218
    np.testing.assert_array_equal(preprocess.scale_boxes_to_256(boxes, (480, 560)),
                                  [[4, 9, 255, 218], [0, 0, 0, 0]])
    # float boxes, enlarging (ratio 2.56): 3.7 * 2.56 = 9.47 -> 9
    np.testing.assert_array_equal(preprocess.scale_boxes_to_256(np.array([[3.7, 0.5, 36.9, 99.0]]), (100, 37)),
                                  [[9, 1, 94, 253]])


def test_get_bbox256_expansion_and_clip():
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[250:255, 1:21] = 1  # rows 250..254, cols 1..20
    np.testing.assert_array_equal(preprocess.get_bbox256(mask), [0, 247, 23, 255])
    np.testing.assert_array_equal(preprocess.get_bbox256(mask, upper=256), [0, 247, 23, 256])
    mask[:] = 0
    mask[100:110, 253:256] = 3
    np.testing.assert_array_equal(preprocess.get_bbox256(mask, expand=5), [248, 95, 255, 114])
    with pytest.raises(ValueError):
        preprocess.get_bbox256(np.zeros((256, 256)))


# ---------------------------------------------------------------------------
# npz building from raw volumes
# ---------------------------------------------------------------------------


def test_window_ct_hand_values():
    volume = np.array([-1000, -160, 40, 240, 1000], dtype=np.int16)
    # clipped to [-160, 240]: (x + 160) / 400 * 255, truncated
    np.testing.assert_array_equal(preprocess.window_ct(volume, 40, 400), [0, 0, 127, 255, 255])
    # rescaled by the clipped volume's own range [0, 100], not the window
    np.testing.assert_array_equal(preprocess.window_ct(np.array([0.0, 40.0, 100.0]), 40, 400), [0, 102, 255])
    assert preprocess.window_ct(np.zeros(4)).dtype == np.uint8
    np.testing.assert_array_equal(preprocess.window_ct(np.full(3, 50.0)), [0, 0, 0])


def test_percentile_to_uint8_hand_values():
    # foreground 1..201: 0.5th percentile = 1 + 0.005*200 = 2, 99.5th = 1 + 0.995*200 = 200
    volume = np.concatenate([np.zeros(50), np.arange(1, 202)]).astype(np.float32)
    out = preprocess.percentile_to_uint8(volume)
    assert out.dtype == np.uint8
    assert np.all(out[:50] == 0)
    # (x - 2) / 198 * 255 truncated: 1 -> 0 (clipped), 101 -> 127.5 -> 127, 200, 201 -> 255
    assert (out[50], out[50 + 100], out[50 + 199], out[50 + 200]) == (0, 127, 255, 255)
    assert out[50 + 51] == int((52 - 2) / 198 * 255)
    # No voxel > 0: the percentiles of all voxels; a constant volume becomes zeros.
    np.testing.assert_array_equal(preprocess.percentile_to_uint8(np.zeros(10)), np.zeros(10))


def test_teacher_input_squashed_and_aspect_preserving():
    ramp = np.tile(np.linspace(10, 210, 50).astype(np.uint8), (100, 1))  # (100, 50), varies along x
    squashed = preprocess.teacher_input(ramp, size=64)
    assert squashed.shape == (64, 64, 3) and squashed.dtype == np.float32
    assert squashed.min() == 0.0 and squashed.max() == 1.0
    # squashed: content fills the square, rows identical, increasing along x
    np.testing.assert_allclose(squashed[0], squashed[-1], atol=1e-6)
    assert np.all(np.diff(squashed[32, 4:-4, 0]) > 0)
    aligned = preprocess.teacher_input(ramp, size=64, keep_aspect=True)
    assert aligned.shape == (64, 64, 3)
    assert np.all(aligned[:, 32:] == 0)  # (100, 50) -> (64, 32) content, right half padding
    assert aligned[:, :32].max() == 1.0
    full = preprocess.teacher_input(np.full((30, 40), 9, np.uint8))
    assert full.shape == (1024, 1024, 3) and np.all(full == 0)


# ---------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------

RESIZE_CASES = [
    ((219, 256), (480, 560)),
    ((256, 95), (100, 37)),    # shrinking rows: no antialias
    ((256, 256), (1000, 1000)),
    ((256, 17), (300, 20)),
    ((5, 7), (3, 2)),
    ((256, 256), (256, 256)),
    ((85, 256), (1000, 3000)),
]


@pytest.mark.parametrize("in_hw, out_hw", RESIZE_CASES)
def test_resize_bilinear_matches_torch(in_hw, out_hw):
    rng = np.random.default_rng(sum(in_hw) + sum(out_hw))
    images = (rng.standard_normal((2,) + in_hw) * 4).astype(np.float32)  # logit-like range
    expected = torch.nn.functional.interpolate(torch.from_numpy(images)[None], size=out_hw,
                                               mode="bilinear", align_corners=False)[0].numpy()
    out = postprocess.resize_bilinear(images, out_hw)
    assert out.shape == (2,) + out_hw and out.dtype == np.float32
    if in_hw == (5, 7):      # a tiny shrink, no crop the predictor meets: 1 ulp apart
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(out, expected)      # PyTorch's roundings, bit for bit


@pytest.mark.parametrize("new_hw, original_hw", [((219, 256), (480, 560)), ((256, 95), (100, 37)),
                                                  ((193, 256), (1536, 2040))])
def test_logits_to_mask_matches_torch_pipeline(new_hw, original_hw):
    """Pixel for pixel, near-zero logits included: the 8x upsampling to 1536 x 2040 meets
    resized logits where float32 rounding (seed 6: one pixel whose sign a plain float32 blend
    gets wrong) and the sigmoid's threshold decide the pixel."""
    large = original_hw == (1536, 2040)
    rng = np.random.default_rng(6 if large else 3)
    logits = (rng.standard_normal((3, 256, 256)) * (1 if large else 4)).astype(np.float32)
    logits[:, new_hw[0]:, :] = 50.0  # padding region must be cropped away
    logits[:, :, new_hw[1]:] = 50.0
    cropped = torch.from_numpy(logits)[:, None, : new_hw[0], : new_hw[1]]
    resized = torch.nn.functional.interpolate(cropped, size=original_hw, mode="bilinear", align_corners=False)
    expected = (torch.sigmoid(resized) > 0.5)[:, 0].numpy()
    masks = postprocess.logits_to_mask(logits, new_hw, original_hw)
    assert masks.shape == (3,) + original_hw and masks.dtype == bool
    np.testing.assert_array_equal(masks, expected)


def test_paint_labels_overwrite_order_and_dtype():
    first = np.zeros((4, 4), bool)
    second = np.zeros((4, 4), bool)
    first[0:3, 0:3] = True
    second[2:4, 2:4] = True
    painted = postprocess.paint_labels([first, second], [1, 2], (4, 4))
    assert painted.dtype == np.uint8
    np.testing.assert_array_equal(painted, [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 2, 2], [0, 0, 2, 2]])
    reversed_order = postprocess.paint_labels([second, first], [2, 1], (4, 4))
    assert reversed_order[2, 2] == 1  # later mask wins

    many = np.zeros((300, 1, 300), bool)
    many[np.arange(300), 0, np.arange(300)] = True
    painted = postprocess.paint_labels(many, range(1, 301), (1, 300))
    assert painted.dtype == np.uint16
    np.testing.assert_array_equal(painted[0], np.arange(1, 301))
    assert postprocess.paint_labels(many[:255], range(1, 256), (1, 300)).dtype == np.uint8
    with pytest.raises(ValueError):
        postprocess.paint_labels([first], [1, 2], (4, 4))


def test_modules_do_not_import_jax():
    code = ("import sys, rep_medsam_jax.metrics, rep_medsam_jax.preprocess, rep_medsam_jax.postprocess; "
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_logits_to_mask_windows_equal_the_whole_image_resize():
    """logits_to_mask resizes each mask only around its positive logits: the result must be
    the whole-image resize thresholded, pixel for pixel (borders, single pixels, empty masks,
    shrinking and enlarging)."""
    rng = np.random.default_rng(7)
    for new_hw, original_hw in [((256, 192), (1536, 1152)), ((200, 256), (150, 190)),
                                ((17, 256), (40, 600)), ((256, 256), (256, 256))]:
        newh, neww = new_hw
        logits = np.full((5, 256, 256), -4.0, np.float32)
        logits[0, newh // 4:newh // 4 + 3, 70:90] = 3.0        # a blob inside
        logits[1, 0, 0] = 0.5                               # a single pixel in a corner
        logits[1, newh - 1, neww - 3:neww] = 2.0            # and a run on the far border
        logits[2] = rng.normal(-2, 2, (256, 256))           # scattered positives
        logits[3, newh:, :] = 9.0                           # positive only in the padding
        logits[4, newh // 2, neww // 2] = 1e-6              # barely positive
        whole = postprocess.resize_bilinear(logits[:, :newh, :neww], original_hw) > 0
        masks = postprocess.logits_to_mask(logits, new_hw, original_hw, workers=1)
        np.testing.assert_array_equal(masks, whole, err_msg=str((new_hw, original_hw)))
        assert masks[0].any() and masks[1].any() and not masks[3].any()
        # Masks resized on several threads: each writes its own mask, the same values.
        threaded = postprocess.logits_to_mask(logits, new_hw, original_hw, workers=3)
        np.testing.assert_array_equal(threaded, whole, err_msg=str((new_hw, original_hw)))


def test_paint_logits_equals_painting_the_resized_masks():
    """paint_logits paints each box's resized mask into the label map without making the masks,
    in row bands on several threads: it must equal paint_labels over the whole-image resizes
    thresholded (overlaps: the later box wins), for any number of threads and row blocks."""
    rng = np.random.default_rng(11)
    new_hw, original_hw = (193, 256), (700, 930)
    newh, neww = new_hw
    logits = rng.normal(-1, 2, (6, 256, 256)).astype(np.float32)    # overlapping scattered masks
    logits[1] = -5.0                                                  # an empty mask
    logits[2] = -5.0
    logits[2, 40:120, 30:200] = 4.0                                   # a large block over others
    logits[5, newh - 1, neww - 1] = 0.3                               # the far corner only
    whole = postprocess.resize_bilinear(logits[:, :newh, :neww], original_hw) > 0
    labels = [3, 7, 300, 1, 2, 9]                                    # any order, past uint8
    expected = postprocess.paint_labels(whole, labels, original_hw, dtype=np.uint16)
    for workers, row_block in [(1, 64), (2, 64), (3, 7), (5, 1000)]:
        old_block = postprocess.ROW_BLOCK
        postprocess.ROW_BLOCK = row_block
        try:
            target = np.full(original_hw, 65535, np.uint16)        # painted over, not cleared
            target[:, :100] = 0
            postprocess.paint_logits(target, logits, labels, new_hw, workers=workers)
        finally:
            postprocess.ROW_BLOCK = old_block
        background = np.where(np.arange(original_hw[1]) < 100, 0, 65535).astype(np.uint16)
        np.testing.assert_array_equal(target, np.where(whole.any(0), expected, background),
                                      err_msg=str((workers, row_block)))
    assert (expected == 300).any() and (expected == 9).any()
    with pytest.raises(ValueError, match="does not fit"):
        postprocess.paint_logits(np.zeros(original_hw, np.uint8), logits, labels, new_hw)
    with pytest.raises(ValueError, match="labels"):
        postprocess.paint_logits(np.zeros(original_hw, np.uint16), logits, labels[:2], new_hw)
