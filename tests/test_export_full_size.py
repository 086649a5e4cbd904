"""The full-size export (RepViT m1.0, folded) against the PyTorch reference directly: a random
PyTorch Rep-MedSAM is converted, exported once (this module's fixture), and onnxruntime's
outputs are compared with the PyTorch model's; its encoder quantised to int8 against fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# Bounds: 5x the figures measured on random weights (printed by the tests; README
# "Exactness"). The embeddings are O(1) (largest |value| about 4).
ENCODER_BOUND = 6.5e-5        # max abs diff, onnxruntime fp32 encoder vs PyTorch (1.3e-5)
DECODER_BOUND = 1.7e-6        # max abs diff of logits and IoU, onnxruntime vs PyTorch (3.4e-7)
VERIFIED_BOUNDS = {"encoder": 3.6e-5, "decoder": 1.5e-6}    # export.json, ONNX vs JAX (5x)
# Static per-channel int8 encoder vs fp32: max abs diff of the embedding over its largest
# |value| (measured 0.14 on these weights, calibrated on 4 phantom images; int8
# rounding, not an exact export).
INT8_RELATIVE_BOUND = 0.25


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def full_export(converted_rep_medsam, torch_rep_medsam, tmp_path_factory):
    """``(export_dir, export.json metadata, the BN-fused PyTorch model)``."""
    import logging

    from rep_medsam_jax.export.onnx_export import export_model_dir
    from tests.reference.medsam_lite_torch import fused_copy

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    path = tmp_path_factory.mktemp("exports") / "m1_0"
    meta = export_model_dir(converted_rep_medsam, path, log=lambda message: None)
    return path, meta, fused_copy(torch_rep_medsam[0])


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Five different (256, 256, 3) float32 images in [0, 1]: noise, smooth ramps, a blank."""
    rng = np.random.default_rng(4)
    ramp = np.linspace(0, 1, 256, dtype=np.float32)
    return np.stack([rng.random((256, 256, 3), dtype=np.float32),
                     np.broadcast_to(ramp[:, None, None], (256, 256, 3)),
                     np.broadcast_to(ramp[None, :, None], (256, 256, 3)) ** 2,
                     rng.random((256, 256, 3), dtype=np.float32) * 0.5,
                     np.zeros((256, 256, 3), np.float32)]).astype(np.float32)


@pytest.mark.slow
def test_full_size_onnx_encoder_and_decoder_match_pytorch(full_export, images):
    import onnxruntime as ort

    path, meta, model = full_export
    encoder = ort.InferenceSession(str(path / "encoder.onnx"))
    decoder = ort.InferenceSession(str(path / "decoder.onnx"))
    got = encoder.run(None, {"images": images[:2]})[0]
    with torch.no_grad():
        want = model.image_encoder(_nchw(images[:2])).permute(0, 2, 3, 1).numpy()
    encoder_error = np.abs(got - want).max()
    assert np.abs(want[0] - want[1]).max() > 0.1 * np.abs(want).max()   # the image matters

    boxes = np.array([[30, 40, 200, 180], [0, 0, 255, 255], [100, 90, 140, 120],
                      [5, 200, 60, 250], [128, 10, 250, 100]], np.float32)
    logits, iou = decoder.run(None, {"embedding": want[:1], "boxes": boxes})
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.from_numpy(boxes),
                                             masks=None)
        want_logits, want_iou = model.mask_decoder(
            image_embeddings=torch.from_numpy(want[:1]).permute(0, 3, 1, 2),
            image_pe=model.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False)
    decoder_error = max(np.abs(logits - want_logits[:, 0].numpy()).max(),
                        np.abs(iou - want_iou[:, 0].numpy()).max())
    print(f"full-size ONNX vs PyTorch: encoder {encoder_error:.2e} (embedding max "
          f"{np.abs(want).max():.2f}), decoder {decoder_error:.2e} (5 boxes); export.json "
          f"vs JAX: {meta['verification']['max_abs_error']}")
    assert encoder_error < ENCODER_BOUND
    assert decoder_error < DECODER_BOUND
    verified = meta["verification"]["max_abs_error"]
    assert all(verified[k] < VERIFIED_BOUNDS[k] for k in VERIFIED_BOUNDS), verified
    # Swapping two boxes' outputs would break the comparison: the boxes' logits differ by
    # far more than the bound.
    for i in range(len(boxes)):
        for j in range(i):
            assert np.abs(want_logits[i, 0] - want_logits[j, 0]).max() > 1e4 * DECODER_BOUND


@pytest.mark.slow
def test_full_size_int8_encoder_stays_within_its_bound_of_fp32(full_export, images, tmp_path):
    """The exporter's int8 recipe (static per-channel QDQ) on the full-size encoder, calibrated
    on four phantom images here (the exporter's 16 images and its speed and mask checks take
    minutes at this size; test_export.py runs them on the tiny model)."""
    import onnxruntime as ort

    from rep_medsam_jax.export import quantize

    path, _, _ = full_export
    prepared, int8_path = tmp_path / "prepared.onnx", tmp_path / "encoder_int8.onnx"
    quantize.prepare_for_quantization(path / "encoder.onnx", prepared)
    quantize.quantize_prepared(prepared, int8_path, quantize.load_calibration_images(None, 4),
                               quantize.DEFAULT_RECIPE)
    fp32 = ort.InferenceSession(str(path / "encoder.onnx")).run(None, {"images": images})[0]
    int8 = ort.InferenceSession(str(int8_path)).run(None, {"images": images})[0]
    relative = np.abs(int8 - fp32).max() / np.abs(fp32).max()
    print(f"int8 vs fp32 encoder: max abs diff / max |fp32| = {relative:.3f}")
    assert relative < INT8_RELATIVE_BOUND
    assert relative > 1e-4                       # it is int8: not the fp32 model under a name


@pytest.mark.slow
def test_full_size_batch_split_over_sessions_keeps_each_image_in_its_place(full_export,
                                                                          images):
    """Five images split over side-by-side sessions: each embedding is the PyTorch
    reference's for the image at that position (the images' embeddings all differ)."""
    from rep_medsam_jax.predictor.onnx_backend import OnnxBackend

    path, _, model = full_export
    backend = OnnxBackend(path / "encoder.onnx", path / "decoder.onnx", threads=2)
    got = backend.encode(images)
    assert len(backend._split_encoders[2]) == 2                 # 5 images over 2 sessions
    with torch.no_grad():
        want = model.image_encoder(_nchw(images)).permute(0, 2, 3, 1).numpy()
    scale = np.abs(want).max()
    for i in range(len(images)):
        for j in range(i):
            assert np.abs(want[i] - want[j]).max() > 0.1 * scale
    assert np.abs(got - want).max() < ENCODER_BOUND
