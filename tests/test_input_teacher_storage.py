"""Storage codecs of teacher embeddings: exact round trips for float16 / bfloat16, and the int8
per-channel bound (every element within scale / 2, scale = max |x| / 127 per slice and channel),
checked on hand-made values."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from input_pipeline.teacher_storage import (decode_slice, dequantize_int8, encode_slices,
                                            quantize_int8, slice_nbytes, stored_values)


def test_int8_codes_and_scales_of_a_hand_made_slice():
    # One slice, 1 x 2 grid, 2 channels: channel 0 peaks at 2.54 -> scale 0.02, channel 1 is 0.
    values = np.array([[[[2.54, 0.0], [-1.01, 0.0]]]], np.float32)     # (1, 1, 2, 2)
    codes, scales = quantize_int8(values)
    assert np.allclose(scales, [[0.02, 1.0]])          # an all-zero channel keeps scale 1
    assert codes[0, 0, :, 0].tolist() == [127, -50]    # -1.01 / 0.02 = -50.5 -> rint -> -50
    assert codes[0, 0, :, 1].tolist() == [0, 0]
    decoded = dequantize_int8(codes, scales)
    assert np.allclose(decoded[0, 0, :, 0], [2.54, -1.0])


def test_int8_error_is_at_most_half_a_scale_step():
    rng = np.random.default_rng(0)
    values = (rng.normal(size=(3, 4, 4, 5)) * [1, 10, 0.01, 100, 0.5]).astype(np.float32)
    codes, scales = quantize_int8(values)
    assert scales.shape == (3, 5)
    assert np.array_equal(scales, np.abs(values).max(axis=(1, 2)) / np.float32(127))
    error = np.abs(dequantize_int8(codes, scales) - values)
    assert (error <= scales[:, None, None, :] / 2 * (1 + 1e-6)).all()
    # The peak of each channel is stored as +-127 exactly.
    assert (np.abs(codes).max(axis=(1, 2)) == 127).all()


@pytest.mark.parametrize("storage_dtype, numpy_dtype", [("float16", np.float16),
                                                         ("bfloat16", ml_dtypes.bfloat16)])
def test_half_precision_round_trips_are_exact_casts(storage_dtype, numpy_dtype):
    rng = np.random.default_rng(1)
    values = rng.normal(size=(2, 3, 3, 4)).astype(np.float32) * 50
    rows = encode_slices(values, storage_dtype)
    assert rows.shape == (2, slice_nbytes((3, 3, 4), storage_dtype)) == (2, 3 * 3 * 4 * 2)
    for row, value in zip(rows, values):
        decoded = decode_slice(row.tobytes(), (3, 3, 4), storage_dtype)
        assert decoded.dtype == numpy_dtype
        assert np.array_equal(decoded.view(np.uint16), value.astype(numpy_dtype).view(np.uint16))


def test_int8_bytes_hold_codes_then_float32_scales():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    rows = encode_slices(values, "int8")
    assert rows.shape == (2, 3 * 3 * 4 + 4 * 4) and slice_nbytes((3, 3, 4), "int8") == 52
    codes, scales = quantize_int8(values)
    assert np.array_equal(rows[:, :36].view(np.int8).reshape(2, 3, 3, 4), codes)
    assert np.array_equal(rows[:, 36:].copy().view("<f4"), scales)
    assert np.array_equal(stored_values(values, "int8"), dequantize_int8(codes, scales))


def test_unknown_storage_dtype_is_refused():
    with pytest.raises(ValueError, match="storage dtype"):
        slice_nbytes((2, 2, 2), "float8")
