"""Export: fold + jax2onnx, verified against JAX before writing; atomic; int8 option."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from rep_medsam_jax.export import onnx_export


def test_export_directory_has_verified_models_and_metadata(tiny_export_dir):
    names = sorted(os.listdir(tiny_export_dir))
    assert names == ["decoder.onnx", "encoder.onnx", "export.json"]
    meta = json.loads((tiny_export_dir / "export.json").read_text())
    assert meta["model"]["encoder_variant"] == "rep_medsam_tiny"
    assert meta["model"]["deployed"] is True               # the encoder was folded
    assert meta["image_size"] == 256 and meta["embedding_size"] == 64
    for name, digest in meta["checksums"].items():
        assert hashlib.sha256((tiny_export_dir / name).read_bytes()).hexdigest() == digest
    errors = meta["verification"]["max_abs_error"]
    # Measured 5.8e-6 / 6.6e-7 (embeddings and logits of scale 4 and 0.7): 5x margins.
    assert 0 < errors["encoder"] < 3e-5 and 0 < errors["decoder"] < 3.5e-6
    assert {"jax", "jax2onnx", "onnxruntime"} <= set(meta["versions"])


def test_exported_models_have_symbolic_batch_and_box_count(tiny_export_dir):
    import onnxruntime as ort

    encoder = ort.InferenceSession(str(tiny_export_dir / "encoder.onnx"))
    decoder = ort.InferenceSession(str(tiny_export_dir / "decoder.onnx"))
    assert isinstance(encoder.get_inputs()[0].shape[0], str)
    assert isinstance(decoder.get_inputs()[1].shape[0], str)
    embeddings = encoder.run(None, {"images": np.zeros((3, 256, 256, 3), np.float32)})[0]
    assert embeddings.shape == (3, 64, 64, 64)
    for n in (1, 7):
        boxes = np.tile(np.array([[10, 20, 100, 120]], np.float32), (n, 1))
        logits, iou = decoder.run(None, {"embedding": embeddings[:1], "boxes": boxes})
        assert logits.shape == (n, 256, 256) and iou.shape == (n,)
        np.testing.assert_allclose(logits, np.repeat(logits[:1], n, 0), atol=1e-5)


def test_decoder_has_no_einsum_node(tiny_export_dir):
    """onnxruntime runs Einsum slowly on the CPU: the decoder's products (attention with one
    image shared by N boxes, transposed convolutions, positional encoding) export as MatMul/Gemm."""
    import onnx

    ops = {node.op_type for node in onnx.load(str(tiny_export_dir / "decoder.onnx")).graph.node}
    assert "Einsum" not in ops
    assert {"MatMul", "Gemm"} <= ops


def test_failed_verification_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)     # no export can pass
    target = tmp_path / "export"
    with pytest.raises(onnx_export.ExportVerificationError, match="encoder .*e-"):
        onnx_export.export_model_dir(tiny_model_dir, target, log=lambda m: None)
    assert os.listdir(tmp_path) == []                        # no half-written folder


def test_export_refuses_to_overwrite_and_rejects_a_non_model(tiny_model_dir, tiny_export_dir,
                                                           tmp_path):
    with pytest.raises(FileExistsError):
        onnx_export.export_model_dir(tiny_model_dir, tiny_export_dir, log=lambda m: None)
    from rep_medsam_jax.model_dir import ModelDirError

    with pytest.raises(ModelDirError, match="config.json"):
        onnx_export.export_model_dir(tmp_path, tmp_path / "x", log=lambda m: None)


@pytest.mark.slow
def test_int8_export_records_speed_and_mask_agreement(tiny_model_dir, tmp_path):
    meta = onnx_export.export_model_dir(tiny_model_dir, tmp_path / "export", int8=True,
                                        log=lambda m: None)
    int8 = meta["int8"]
    assert (tmp_path / "export" / "encoder_int8.onnx").is_file()
    assert "encoder_int8.onnx" in meta["checksums"]
    assert int8["calibration_images"] == 16 and int8["latency_int8_s"] > 0
    # Mask agreement of int8 with fp32 on the phantom cases: int8 rounding moves some pixels
    # (below 1), but the masks stay close.
    assert 0.5 < int8["mask_dsc_int8_vs_fp32"] < 1.0
    import onnx

    model = onnx.load(str(tmp_path / "export" / "encoder_int8.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops        # static QDQ, not ConvInteger
    assert "ConvInteger" not in ops
    # Quantised from jax2onnx's graph as written (its NHWC gates suit channels-last int8 convs,
    # and its Expands keep the SE residual Adds in float), while the fp32 encoder is rewritten.
    assert {"ReduceMean", "Gemm", "Expand"} <= ops and "GlobalAveragePool" not in ops
    assert meta["encoder_graph_rewrites"]["squeeze_excite_blocked"] == 4
    fp32_ops = {n.op_type for n in onnx.load(str(tmp_path / "export" / "encoder.onnx")).graph.node}
    assert "GlobalAveragePool" in fp32_ops and "Gemm" not in fp32_ops
