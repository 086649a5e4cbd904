"""rep_medsam_jax: Rep-MedSAM (box-prompted medical image segmentation) in JAX/Flax.

The package root imports nothing heavy: the CPU deploy path (ONNX Runtime) never imports JAX.
"""

__version__ = "0.1.0"
