"""The backend interface and the factory that picks one by name."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Backend(Protocol):
    """What the case procedures need from a model."""

    image_size: int

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) float32 in [0, 1] -> embeddings (B, h, w, C) float32."""

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(1, h, w, C) and boxes (N, 4) in the S x S frame -> (logits (N, S, S), iou (N,))."""


INT8_ENCODER = "encoder_int8.onnx"


def open_backend(model_path: str | Path, backend: str = "onnx", threads: int | None = None,
                 int8: bool = False) -> Backend:
    """A backend over an export directory (onnx, openvino) or a model directory (jax).

    ``int8`` picks the export's static int8 encoder (``export --int8``) instead of the fp32 one.
    """
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise FileNotFoundError(f"{model_path}: no such model or export directory")
    is_export = (model_path / "export.json").is_file()
    if backend in ("onnx", "openvino") and not is_export:
        if (model_path / "config.json").is_file():
            raise ValueError(f"{model_path} is a model directory: use --backend jax, or export it "
                             "first with `rep-medsam export`")
        raise ValueError(f"{model_path}: not an export directory (no export.json)")
    encoder_file = None
    if int8:
        if backend == "jax":
            raise ValueError("--int8 runs the exported int8 encoder: use --backend onnx or "
                             "openvino with an EXPORT_DIR")
        if not (model_path / INT8_ENCODER).is_file():
            raise ValueError(f"{model_path} has no {INT8_ENCODER}: export it with "
                             "`rep-medsam export MODEL_DIR -o EXPORT_DIR --int8`")
        encoder_file = INT8_ENCODER
    if backend == "onnx":
        from rep_medsam_jax.predictor.onnx_backend import OnnxBackend  # noqa: PLC0415

        return OnnxBackend.from_export_dir(model_path, threads=threads, encoder_file=encoder_file)
    if backend == "openvino":
        from rep_medsam_jax.predictor.openvino_backend import OpenVinoBackend  # noqa: PLC0415

        return OpenVinoBackend(model_path, threads=threads, encoder_file=encoder_file)
    if backend == "jax":
        if is_export:
            raise ValueError(f"{model_path} is an export directory: use --backend onnx")
        from rep_medsam_jax.predictor.jax_backend import JaxBackend  # noqa: PLC0415

        return JaxBackend(model_path)
    raise ValueError(f"unknown backend {backend!r}: choose onnx, openvino or jax")
