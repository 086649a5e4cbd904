"""OpenVINO backend on the same ONNX files as the onnxruntime one (``pip install '.[openvino]'``).

The CVPR 2024 winners ran OpenVINO; ``benchmarks/predict.py --openvino`` compares the two on
this machine (docs/benchmarks.md says which is faster here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class OpenVinoBackend:
    """``encode`` / ``decode`` on OpenVINO CPU compiled models (latency hint)."""

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None,
                 encoder_file: str | None = None):
        try:
            import openvino as ov  # noqa: PLC0415
        except ImportError as err:
            raise ValueError("the openvino backend needs OpenVINO: "
                             "pip install 'rep-medsam-jax[openvino]'") from err
        export_dir = Path(export_dir)
        meta = json.loads((export_dir / "export.json").read_text())
        self.image_size = int(meta["image_size"])
        encoder_file = encoder_file or meta.get("default_encoder", "encoder.onnx")
        core = ov.Core()
        # f32 explicitly: on CPUs with bf16 support OpenVINO otherwise lowers the precision by
        # default, and the masks drift from the onnxruntime / JAX ones.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                  "INFERENCE_NUM_THREADS": int(threads or os.cpu_count() or 1)}
        self._encoder = core.compile_model(core.read_model(export_dir / encoder_file), "CPU",
                                           config)
        self._decoder = core.compile_model(core.read_model(export_dir / "decoder.onnx"), "CPU",
                                           config)
        self._encoder_request = self._encoder.create_infer_request()
        self._decoder_request = self._decoder.create_infer_request()

    def encode(self, images: np.ndarray) -> np.ndarray:
        result = self._encoder_request.infer([np.ascontiguousarray(images, np.float32)])
        return np.array(result[self._encoder.output(0)])

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self._decoder_request.infer([np.ascontiguousarray(embedding, np.float32),
                                              np.ascontiguousarray(boxes, np.float32)])
        return (np.array(result[self._decoder.output(0)]),
                np.array(result[self._decoder.output(1)]))
