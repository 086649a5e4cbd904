"""rep_medsam_jax: Rep-MedSAM (box-prompted medical image segmentation) in JAX/Flax.

The package root imports nothing heavy: the CPU deploy path (ONNX Runtime) never imports JAX.
``rep_medsam_jax.Segmenter`` (interactive use, :mod:`rep_medsam_jax.predictor.segmenter`) is
imported when first named.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Segmenter":
        from rep_medsam_jax.predictor.segmenter import Segmenter  # noqa: PLC0415

        return Segmenter
    raise AttributeError(f"module 'rep_medsam_jax' has no attribute {name!r}")
