"""The small built dataset that the training-loop, preemption and device-input tests share."""

from __future__ import annotations

from pathlib import Path


def build_2d_phantoms(root: Path, n2d: int):
    """``n2d`` 64 x 64 phantom images of four modalities written under ``root/phantoms`` and
    built at 32 x 32 (a quarter held out for validation) under ``root/tfds``: the BuildResult."""
    from input_pipeline.phantoms import write_phantom_dataset
    from input_pipeline.tfds_builder import BuildOptions, build_dataset

    cases = write_phantom_dataset(root / "phantoms", n2d=n2d, n3d=0, seed=0, size_2d=64,
                                  modalities_2d=("CT", "MR", "US", "Dermoscopy"))
    return build_dataset(cases.inputs_dir.parent, root / "tfds",
                         BuildOptions(image_size=32, validation_fraction=0.25),
                         log=lambda message: None)
