"""PNG / JPEG images (OpenCV): 2D cases as RGB uint8, and PNG label maps.

Grey images are repeated to 3 channels, alpha is dropped, colour is RGB. 16-bit images whose
maximum exceeds 255 are min-max scaled to 0..255 (truncated, as ``pre_grey_rgb.py`` of the
MedSAM repository does); others are cast. EXIF orientation is ignored: boxes and outputs refer
to the pixel grid as stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rep_medsam_jax.io.errors import CaseReadError, NonFiniteImageError, check_not_empty
from rep_medsam_jax.io.intensity import as_rgb, min_max_to_uint8, to_uint8


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """The pixels of a PNG / JPEG as stored: (H, W) grey or (H, W, 3) RGB, any bit depth."""
    import cv2  # noqa: PLC0415

    path = Path(path)
    try:
        encoded = np.fromfile(path, dtype=np.uint8)   # not cv2.imread: handles any path text
    except OSError as err:
        raise CaseReadError(f"{path}: cannot read the image: {err}") from None
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if encoded.size else None
    if decoded is None:
        raise CaseReadError(f"{path}: cannot decode the image (corrupt or not a PNG/JPEG)")
    if decoded.ndim == 3 and decoded.shape[2] == 3:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    elif decoded.ndim == 3 and decoded.shape[2] == 4:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)    # drops alpha
    return decoded


def image_to_rgb_uint8(image: np.ndarray, where: str) -> np.ndarray:
    """A decoded 2D image -> (H, W, 3) uint8 (the rule of the module docstring)."""
    check_not_empty(image, where)
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
            raise NonFiniteImageError(f"{where}: image has NaN or infinite pixels")
        image = min_max_to_uint8(image) if image.max() > 255 else to_uint8(image, where)
    return as_rgb(image, where)


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """A single-channel PNG label map as stored, (H, W)."""
    labels = decode_image(path)
    if labels.ndim != 2:
        raise CaseReadError(f"{Path(path).name}: not a single-channel PNG label map")
    return labels
