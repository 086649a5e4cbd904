"""onnxruntime backend over an export directory (encoder.onnx + decoder.onnx + export.json).

Imports neither JAX nor PyTorch. Sessions are created once and reused for every case.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PROVIDERS = ["CPUExecutionProvider"]


def session_options(threads: int | None = None, spin: bool = False):
    """Full graph optimisation, ``threads`` intra-op threads (default: every core).

    ``spin=False`` makes idle worker threads sleep instead of busy-waiting between operators.
    With one thread per core, spinning takes the cores from everything else on the machine
    (the decoder has hundreds of small operators, so the workers spin much of the time); on a
    shared 2-core machine sleeping is 10-30 % faster (docs/benchmarks.md).
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

        self._threads = threads or os.cpu_count() or 1
        options = session_options(self._threads)
        self.image_size = image_size
        self._encoder_path = str(encoder_path)
        # The two sessions are set up side by side: onnxruntime releases the GIL while it loads
        # and optimises a graph (2 cores: 0.19-0.24 s one after the other, 0.13-0.15 s together).
        with ThreadPoolExecutor(max_workers=2) as pool:
            encoder = pool.submit(ort.InferenceSession, self._encoder_path, options,
                                  providers=PROVIDERS)
            decoder = pool.submit(ort.InferenceSession, str(decoder_path), options,
                                  providers=PROVIDERS)
            self._encoder, self._decoder = encoder.result(), decoder.result()
        self._encoder_input = self._encoder.get_inputs()[0].name
        self._decoder_inputs = [i.name for i in self._decoder.get_inputs()]
        self._split_encoders: dict[int, list] = {}    # parts -> sessions, made when first needed

    @classmethod
    def from_export_dir(cls, export_dir: str | os.PathLike, threads: int | None = None,
                        encoder_file: str | None = None) -> "OnnxBackend":
        export_dir = Path(export_dir)
        meta = json.loads((export_dir / "export.json").read_text())
        encoder_file = encoder_file or meta.get("default_encoder", "encoder.onnx")
        return cls(export_dir / encoder_file, export_dir / "decoder.onnx",
                   int(meta["image_size"]), threads)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) float32 in [0, 1] -> (B, h, w, C) embeddings.

        A batch of several images (the slices of a volume) is split over sessions running side
        by side, each with its share of the threads: independent images need no
        synchronisation between threads at every operator, which one session spread over all
        of them pays (2 cores, 8 slices in calls of 4: 0.92-0.99x the time in fp32, 0.82-0.90x
        in int8; benchmarks/batch_encode.py). One image runs on the one session with every
        thread.
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        parts = min(len(images), self._threads)
        if parts < 2:
            return self._encoder.run(None, {self._encoder_input: images})[0]
        sessions = self._encoders_side_by_side(parts)
        chunks = np.array_split(images, parts)
        with ThreadPoolExecutor(max_workers=parts) as pool:      # run() releases the GIL
            embeddings = pool.map(lambda pair: pair[0].run(None, {self._encoder_input: pair[1]})[0],
                                  zip(sessions, chunks))
            return np.concatenate(list(embeddings))

    def _encoders_side_by_side(self, parts: int) -> list:
        """``parts`` encoder sessions with ``threads // parts`` threads each (made once)."""
        import onnxruntime as ort  # noqa: PLC0415

        if parts not in self._split_encoders:
            options = session_options(max(1, self._threads // parts))
            with ThreadPoolExecutor(max_workers=parts) as pool:   # set up side by side
                self._split_encoders[parts] = list(pool.map(
                    lambda _: ort.InferenceSession(self._encoder_path, options,
                                                   providers=PROVIDERS), range(parts)))
        return self._split_encoders[parts]

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feeds = dict(zip(self._decoder_inputs,
                         (np.ascontiguousarray(embedding, dtype=np.float32),
                          np.ascontiguousarray(boxes, dtype=np.float32))))
        logits, iou = self._decoder.run(None, feeds)
        return logits, iou
