"""Overlay PNGs (off by default: they cost time): the image with each label's mask tinted."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rep_medsam_jax.io.atomic import write_bytes_atomic


def _palette(n: int) -> np.ndarray:
    """n distinct RGB colours (golden-angle hues), (n, 3) uint8."""
    import cv2  # noqa: PLC0415

    hues = (np.arange(n) * 137.508) % 180
    hsv = np.stack([hues, np.full(n, 220), np.full(n, 255)], axis=-1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def overlay_image(image: np.ndarray, segs: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 image and (H, W) labels -> (H, W, 3) uint8 RGB overlay."""
    import cv2  # noqa: PLC0415

    rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
    out = rgb.astype(np.float32)
    labels = [int(v) for v in np.unique(segs) if v > 0]
    colours = _palette(max(labels, default=0) + 1)
    for label in labels:
        mask = segs == label
        out[mask] = (1 - alpha) * out[mask] + alpha * colours[label]
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in colours[label]), 1)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_overlay(case, segs: np.ndarray, overlay_dir: str | Path) -> Path:
    """One PNG per case; for a volume, the slice with the most foreground."""
    import cv2  # noqa: PLC0415

    overlay_dir = Path(overlay_dir)
    image, labels = case.image, segs
    if case.is_3d:
        z = int(np.argmax((segs > 0).reshape(segs.shape[0], -1).sum(1)))
        image, labels = case.image[z], segs[z]
    path = overlay_dir / f"{case.name}.png"
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(overlay_image(image, labels),
                                                    cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    return write_bytes_atomic(path, encoded.tobytes())
