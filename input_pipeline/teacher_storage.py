"""How one teacher embedding is stored: float16, bfloat16 or int8 with per-channel scales.

A stored slice is a fixed number of bytes (``slice_nbytes``), so slice i of a shard starts at
byte ``i * slice_nbytes`` and is read with one seek + readinto from any open file:

* ``float16`` / ``bfloat16``: the (g, g, C) embedding, row-major, little-endian;
* ``int8``: the (g, g, C) int8 codes, then C float32 scales. Symmetric quantisation per slice
  and channel: scale_c = max |x[..., c]| / 127 (1 for an all-zero channel), code =
  round(x / scale_c), decoded as code * scale_c; so every element is off by at most scale_c / 2.
"""

from __future__ import annotations

import numpy as np

STORAGE_DTYPES = ("float16", "bfloat16", "int8")
INT8_LEVELS = 127


def _element_dtype(storage_dtype: str) -> np.dtype:
    if storage_dtype == "bfloat16":
        import ml_dtypes  # noqa: PLC0415

        return np.dtype(ml_dtypes.bfloat16)
    if storage_dtype in STORAGE_DTYPES:
        return np.dtype(storage_dtype).newbyteorder("<")
    raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")


def slice_nbytes(shape: tuple[int, int, int], storage_dtype: str) -> int:
    """Bytes of one stored (g, g, C) embedding, scales included."""
    count = int(np.prod(shape)) * _element_dtype(storage_dtype).itemsize
    return count + (shape[-1] * 4 if storage_dtype == "int8" else 0)


def quantize_int8(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, g, g, C) float -> codes (n, g, g, C) int8 and scales (n, C) float32."""
    values = np.asarray(embeddings, np.float32)
    peak = np.abs(values).max(axis=(1, 2))
    scales = np.where(peak > 0, peak / INT8_LEVELS, 1.0).astype(np.float32)
    codes = np.rint(values / scales[:, None, None, :])
    return np.clip(codes, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), scales


def dequantize_int8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """codes (..., g, g, C) int8, scales (..., C) float32 -> float32 of the codes' shape."""
    return codes.astype(np.float32) * scales[..., None, None, :]


def encode_slices(embeddings: np.ndarray, storage_dtype: str) -> np.ndarray:
    """(n, g, g, C) float -> (n, slice_nbytes) uint8: the bytes to store, one row per slice."""
    values = np.asarray(embeddings)
    count = values.shape[0]
    if storage_dtype == "int8":
        codes, scales = quantize_int8(values)
        return np.concatenate([codes.reshape(count, -1).view(np.uint8),
                               scales.astype("<f4").reshape(count, -1).view(np.uint8)], axis=1)
    stored = values.astype(_element_dtype(storage_dtype))
    return np.ascontiguousarray(stored).reshape(count, -1).view(np.uint8)


def decode_slice(buffer: bytes | bytearray | memoryview | np.ndarray,
                 shape: tuple[int, int, int], storage_dtype: str) -> np.ndarray:
    """One slice's bytes -> (g, g, C): float16, ml_dtypes.bfloat16, or float32 for int8."""
    raw = np.frombuffer(buffer, np.uint8)
    element = _element_dtype(storage_dtype)
    count = int(np.prod(shape))
    values = raw[:count * element.itemsize].view(element).reshape(shape)
    if storage_dtype != "int8":
        return values.copy()
    scales = raw[count:].view("<f4")
    return dequantize_int8(values, scales)


def stored_values(embeddings: np.ndarray, storage_dtype: str) -> np.ndarray:
    """What reading back (n, g, g, C) embeddings stored as ``storage_dtype`` gives, as float32
    (for measuring the storage error without files)."""
    rows = encode_slices(embeddings, storage_dtype)
    shape = tuple(np.asarray(embeddings).shape[1:])
    return np.stack([decode_slice(row, shape, storage_dtype).astype(np.float32) for row in rows])
