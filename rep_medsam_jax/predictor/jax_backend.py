"""JAX backend over a model directory: folds the encoder and jits encode / decode once."""

from __future__ import annotations

import os

import numpy as np


def _bucket(n: int) -> int:
    """Pad box counts to powers of two so that jit compiles a handful of shapes, not one per N."""
    return 1 << max(0, (n - 1).bit_length())


class JaxBackend:
    def __init__(self, model_dir: str | os.PathLike):
        import jax  # noqa: PLC0415

        from rep_medsam_jax.model_dir import load_model_dir  # noqa: PLC0415
        from rep_medsam_jax.models.deploy import deployed_model, model_functions  # noqa: PLC0415

        config, variables = deployed_model(*load_model_dir(model_dir), source=str(model_dir))
        encode, decode = model_functions(config, jax.device_put(variables))
        self.config = config
        self.image_size = config.image_size
        self._encode = jax.jit(encode)
        self._decode = jax.jit(decode)

    def encode(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._encode(np.asarray(images, np.float32)))

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes = np.asarray(boxes, np.float32)
        n = len(boxes)
        padded = np.zeros((_bucket(n), 4), np.float32)
        padded[:n] = boxes
        logits, iou = self._decode(np.asarray(embedding, np.float32), padded)
        return np.asarray(logits)[:n], np.asarray(iou)[:n]
