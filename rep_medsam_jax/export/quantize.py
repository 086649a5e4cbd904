"""Static per-channel int8 (QDQ) quantisation of the exported encoder, with its cost measured.

Dynamic int8 is slower than fp32 for convolutions on CPU and breaks depthwise-heavy CNNs
(FIELD.md, TOOLCHAIN.md), so it is not offered. The int8 encoder is an extra file; the fp32
encoder stays the default.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rep_medsam_jax.preprocess import preprocess_image

PHANTOM_MODALITIES = ("CT", "MR", "Endoscopy", "Dermoscopy", "Microscopy")


def phantom_cases(count: int, seed: int = 1234, size: int = 256) -> list[tuple]:
    """Generated 2D cases ``(image (H, W, 3) uint8, gts, boxes (N, 4))`` of mixed modalities."""
    from input_pipeline.phantoms import make_case_2d  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    return [make_case_2d(rng, PHANTOM_MODALITIES[i % len(PHANTOM_MODALITIES)], size)
            for i in range(count)]


def load_calibration_images(folder: str | Path | None, count: int = 16) -> np.ndarray:
    """(count, S, S, 3) float32 model inputs from a folder of cases, or from phantoms."""
    images = []
    if folder is not None:
        from rep_medsam_jax.io.cases import discover_cases, read_case  # noqa: PLC0415

        for path in discover_cases(folder):
            try:
                case = read_case(path)
            except ValueError:
                continue
            slices = [case.image[z] for z in np.linspace(0, len(case.image) - 1, 4).astype(int)] \
                if case.is_3d else [case.image]
            for image in slices:
                images.append(preprocess_image(image)[0])
            if len(images) >= count:
                break
        if not images:
            raise ValueError(f"{folder}: no readable cases for calibration")
    else:
        images = [preprocess_image(image)[0] for image, _, _ in phantom_cases(count)]
    return np.stack(images[:count]).astype(np.float32)


class _Reader:
    """onnxruntime CalibrationDataReader over an array of images, one per batch."""

    def __init__(self, input_name: str, images: np.ndarray):
        self._items = iter([{input_name: image[None]} for image in images])

    def get_next(self):
        return next(self._items, None)


def _median_latency(session, name: str, image: np.ndarray, repeats: int = 5) -> float:
    session.run(None, {name: image})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: image})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mask_agreement(fp32_backend, int8_backend, cases) -> float:
    """Mean DSC per label between the masks of two backends on the same cases."""
    from rep_medsam_jax.metrics import dice  # noqa: PLC0415
    from rep_medsam_jax.predictor.cases import predict_2d  # noqa: PLC0415

    scores = []
    for image, _, boxes in cases:
        a, b = predict_2d(fp32_backend, image, boxes), predict_2d(int8_backend, image, boxes)
        for label in range(1, len(boxes) + 1):
            if np.any(a == label) or np.any(b == label):
                scores.append(dice(a == label, b == label))
    return float(np.mean(scores)) if scores else 1.0


def quantize_encoder(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray | None,
                     decoder_path: Path, image_size: int = 256, agreement_cases: int = 8) -> dict:
    """Write ``int8_path``; return calibration size, speed ratio and mask agreement."""
    import onnxruntime as ort  # noqa: PLC0415
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat,  # noqa: PLC0415
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    from rep_medsam_jax.predictor.onnx_backend import OnnxBackend, session_options  # noqa

    if calibration_images is None:
        calibration_images = load_calibration_images(None)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        input_name = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]
                                          ).get_inputs()[0].name
        quantize_static(str(prepared), str(int8_path), _Reader(input_name, calibration_images),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)

    fp32 = ort.InferenceSession(str(fp32_path), session_options(), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(int8_path), session_options(), providers=["CPUExecutionProvider"])
    image = calibration_images[:1]
    t_fp32 = _median_latency(fp32, fp32.get_inputs()[0].name, image)
    t_int8 = _median_latency(int8, int8.get_inputs()[0].name, image)
    cases = phantom_cases(agreement_cases, seed=99)
    agreement = mask_agreement(OnnxBackend(fp32_path, decoder_path, image_size),
                               OnnxBackend(int8_path, decoder_path, image_size), cases)
    return {"file": int8_path.name, "calibration_images": int(len(calibration_images)),
            "scheme": "static QDQ, per-channel int8 weights, uint8 activations, MinMax",
            "latency_fp32_s": t_fp32, "latency_int8_s": t_int8,
            "speed_ratio_int8_over_fp32": t_int8 / t_fp32,
            "mask_dsc_int8_vs_fp32": agreement, "agreement_cases": agreement_cases}
