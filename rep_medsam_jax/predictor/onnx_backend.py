"""onnxruntime backend over an export directory (encoder.onnx + decoder.onnx + export.json).

Imports neither JAX nor PyTorch. Sessions are created once and reused for every case.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def session_options(threads: int | None = None, spin: bool = False):
    """Full graph optimisation, ``threads`` intra-op threads (default: every core).

    ``spin=False`` makes idle worker threads sleep instead of busy-waiting between operators.
    With one thread per core, spinning takes the cores from everything else on the machine
    (the decoder has hundreds of small operators, so the workers spin much of the time); on a
    shared 2-core machine sleeping was 10-30 % faster (docs/benchmarks.md).
    """
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


class OnnxBackend:
    """``encode`` / ``decode`` on onnxruntime CPU sessions."""

    def __init__(self, encoder_path: str | os.PathLike, decoder_path: str | os.PathLike,
                 image_size: int = 256, threads: int | None = None):
        import onnxruntime as ort  # noqa: PLC0415

        providers = ["CPUExecutionProvider"]
        options = session_options(threads)
        self.image_size = image_size
        self._encoder = ort.InferenceSession(str(encoder_path), options, providers=providers)
        self._decoder = ort.InferenceSession(str(decoder_path), options, providers=providers)
        self._encoder_input = self._encoder.get_inputs()[0].name
        self._decoder_inputs = [i.name for i in self._decoder.get_inputs()]

    @classmethod
    def from_export_dir(cls, export_dir: str | os.PathLike, threads: int | None = None,
                        encoder_file: str | None = None) -> "OnnxBackend":
        export_dir = Path(export_dir)
        meta = json.loads((export_dir / "export.json").read_text())
        encoder_file = encoder_file or meta.get("default_encoder", "encoder.onnx")
        return cls(export_dir / encoder_file, export_dir / "decoder.onnx",
                   int(meta["image_size"]), threads)

    def encode(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        return self._encoder.run(None, {self._encoder_input: images})[0]

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feeds = dict(zip(self._decoder_inputs,
                         (np.ascontiguousarray(embedding, dtype=np.float32),
                          np.ascontiguousarray(boxes, dtype=np.float32))))
        logits, iou = self._decoder.run(None, feeds)
        return logits, iou
