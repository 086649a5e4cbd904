"""Box-prompted inference on 2D images and 3D volumes, written once against a tiny backend.

A backend has ``encode(images (B, S, S, 3) float32) -> (B, h, w, C)`` and
``decode(embedding (1, h, w, C), boxes (N, 4) float32) -> (logits (N, S, S), iou (N,))``.
Backends: ``onnx`` (onnxruntime, no JAX), ``openvino`` (same ONNX files), ``jax`` (a model dir).
"""
