"""Fold the encoder and export two ONNX models with jax2onnx, verified before they are written.

Export directory::

    EXPORT_DIR/
      encoder.onnx        images (B, S, S, 3) float32 in [0, 1] -> embeddings (B, h, w, C)
      decoder.onnx        embedding (1, h, w, C), boxes (N, 4) -> low_res_logits (N, S, S), iou (N,)
      encoder_int8.onnx   (with --int8) static per-channel QDQ int8 encoder
      export.json         variant, preprocessing constants, versions, checksums, verification

B and N are symbolic. The encoder graph gets value-preserving rewrites that keep onnxruntime in
its blocked conv layout, and the decoder's LayerNorms become single LayerNormalization nodes
(graph_passes.py). Every model is run in onnxruntime against JAX on
random inputs before anything is written; an error above the tolerance fails the export with
the figures.
"""

from __future__ import annotations

import hashlib
import json
import platform
import tempfile
from collections.abc import Callable, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from rep_medsam_jax.export.graph_passes import (drop_broadcast_expands, fuse_layer_norms,
                                                 squeeze_excite_blocked)
from rep_medsam_jax.model_dir import atomic_directory, load_model_dir
from rep_medsam_jax.models.deploy import deployed_functions
from rep_medsam_jax.predictor.backend import INT8_ENCODER   # the file predict --int8 opens
from rep_medsam_jax.predictor.onnx_backend import PROVIDERS

EXPORT_FORMAT = "rep_medsam_jax.export"
TOLERANCE = 1e-3
OPSET = 21


class ExportVerificationError(RuntimeError):
    """onnxruntime's output differs from JAX's by more than the tolerance."""


def _to_onnx(fn: Callable, inputs: Sequence, name: str, input_names: Sequence[str],
             output_names: Sequence[str]):
    import logging  # noqa: PLC0415

    from jax2onnx import to_onnx  # noqa: PLC0415

    # onnx_ir warns about every untyped shape constant; the models are verified below instead.
    serde_log = logging.getLogger("onnx_ir.serde")
    previous = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        proto = to_onnx(fn, list(inputs), model_name=name, opset=OPSET, return_mode="proto",
                        input_names=list(input_names), output_names=list(output_names))
    finally:
        serde_log.setLevel(previous)
    # Stale NHWC shape annotations left by jax2onnx can make onnxruntime fail to load conv
    # nets; value_info is optional (onnxruntime infers the shapes), so it is dropped.
    del proto.graph.value_info[:]
    return proto


def _max_abs_error(proto, want: Sequence[np.ndarray], feeds: Sequence[np.ndarray]) -> float:
    """The largest |onnxruntime(proto)(feeds) - want| over all outputs; want: JAX's outputs."""
    import onnxruntime as ort  # noqa: PLC0415

    session = ort.InferenceSession(proto.SerializeToString(), providers=PROVIDERS)
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, feeds)))
    return max(float(np.max(np.abs(np.asarray(w) - g))) for w, g in zip(want, got))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("rep-medsam-jax", "jax", "flax", "jax2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def encoder_to_onnx(encode: Callable, image_size: int):
    """jax2onnx's graph of ``encode``: images (B, S, S, 3) -> embeddings, B symbolic; before
    the layout rewrites of graph_passes.py."""
    return _to_onnx(encode, [("B", image_size, image_size, 3)], "image_encoder", ["images"],
                    ["embeddings"])


def export_model_dir(model_dir: str | Path, out_dir: str | Path, int8: bool = False,
                     calibration_images: np.ndarray | None = None, overwrite: bool = False,
                     seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Export ``model_dir`` to ``out_dir``; returns the metadata written to export.json."""
    import jax  # noqa: PLC0415

    config, encode, decode = deployed_functions(*load_model_dir(model_dir),
                                                source=str(model_dir))
    size, grid, channels = config.image_size, config.embedding_size, config.decoder.embed_dim

    log("exporting the image encoder")
    encoder_proto = encoder_to_onnx(encode, size)
    # The int8 encoder is quantised from jax2onnx's graph as written. Its int8 convs run
    # channels-last, where the NHWC squeeze-excite gate already fits (from the gate-rewritten
    # graph: 1.08-1.23x the time); and once the Expands are gone onnxruntime also runs the SE
    # blocks' residual Adds in int8 (24 QLinearAdd instead of 14), 5 % faster but rounded
    # (mask DSC vs fp32 on the phantom cases 0.715 instead of 0.754; docs/benchmarks.md).
    int8_source = encoder_proto.SerializeToString() if int8 else None
    rewrites = {"broadcast_expands_dropped": drop_broadcast_expands(encoder_proto),
                "squeeze_excite_blocked": squeeze_excite_blocked(encoder_proto)}
    log("exporting the prompt encoder + mask decoder")
    box_spec = jax.ShapeDtypeStruct(("N", 4), np.float32)
    decoder_proto = _to_onnx(decode, [(1, grid, grid, channels), box_spec], "prompt_decoder",
                             ["embedding", "boxes"], ["low_res_logits", "iou"])
    decoder_rewrites = {"layer_norms_fused": fuse_layer_norms(decoder_proto)}

    rng = np.random.default_rng(seed)
    images = rng.random((2, size, size, 3), dtype=np.float32)
    # JAX's side compiled once per model: run op by op, a full-size encoder compiles each of
    # its primitives on its own, minutes on a slow machine.
    embeddings = np.asarray(jax.jit(encode)(images))
    boxes = np.sort(rng.uniform(0, size, (3, 2, 2)), axis=1).reshape(3, 4)[:, [0, 2, 1, 3]]
    boxes = boxes.astype(np.float32)
    decoded = jax.jit(decode)(embeddings[:1], boxes)
    errors = {"encoder": _max_abs_error(encoder_proto, [embeddings], [images]),
              "decoder": _max_abs_error(decoder_proto, decoded, [embeddings[:1], boxes])}
    log(f"verified against JAX: max abs error encoder {errors['encoder']:.2e}, "
        f"decoder {errors['decoder']:.2e} (tolerance {TOLERANCE:g})")
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    if bad:
        raise ExportVerificationError(
            "ONNX export differs from JAX beyond the tolerance "
            f"{TOLERANCE:g}: " + ", ".join(f"{k} {v:.3e}" for k, v in bad.items()))

    import onnx  # noqa: PLC0415

    meta = {
        "format": EXPORT_FORMAT, "version": 1,
        "model": config.to_json(), "source_model_dir": str(model_dir),
        "image_size": size, "embedding_size": grid, "embedding_dim": channels,
        "preprocessing": {"resize": "longest side to image_size, OpenCV INTER_AREA, "
                          "int(x * scale + 0.5)", "normalise": "min-max over the resized image",
                          "pad": "zeros bottom/right", "boxes": "x * image_size / max(H, W), "
                          "truncated"},
        "verification": {"max_abs_error": errors, "tolerance": TOLERANCE},
        "encoder_graph_rewrites": rewrites, "decoder_graph_rewrites": decoder_rewrites,
        "versions": _versions(), "opset": OPSET, "default_encoder": "encoder.onnx",
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        onnx.save(encoder_proto, tmp / "encoder.onnx")
        onnx.save(decoder_proto, tmp / "decoder.onnx")
        if int8:
            from rep_medsam_jax.export.quantize import quantize_encoder  # noqa: PLC0415

            log("quantising the encoder to static per-channel int8")
            with tempfile.TemporaryDirectory() as scratch:
                source = Path(scratch) / "encoder_as_jax2onnx_wrote_it.onnx"
                source.write_bytes(int8_source)
                meta["int8"] = quantize_encoder(tmp / "encoder.onnx", tmp / INT8_ENCODER,
                                                calibration_images, tmp / "decoder.onnx", size,
                                                source_path=source)
            log(f"int8 encoder: {meta['int8']['speed_ratio_int8_over_fp32']:.2f}x the fp32 "
                f"latency, mask DSC vs fp32 {meta['int8']['mask_dsc_int8_vs_fp32']:.4f}")
        meta["checksums"] = {p.name: _sha256(p) for p in sorted(tmp.glob("*.onnx"))}
        (tmp / "export.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
