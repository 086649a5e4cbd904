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


def write_nested_corpus(root: Path, flat: Path, n2d: int = 3, n3d: int = 1,
                        seed: int = 0) -> list[str]:
    """Phantom cases re-laid as the challenge's training release: ``root/<Modality>/
    <Modality>Set/<name>.npz`` with ``imgs`` and ``gts`` in one file (written first under
    ``flat`` in the evaluation layout). Returns the case names."""
    import numpy as np
    from input_pipeline.phantoms import write_phantom_dataset

    write_phantom_dataset(flat, n2d=n2d, n3d=n3d, seed=seed, size_2d=(24, 32),
                          shape_3d=(4, 24, 24))
    names = []
    for path in sorted((flat / "inputs").glob("*.npz")):
        with np.load(path) as image, np.load(flat / "gts" / path.name) as truth:
            modality = path.stem.split("_")[1]
            target = root / modality / f"{modality}Set" / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            np.savez(target, imgs=image["imgs"], gts=truth["gts"])
        names.append(path.stem)
    return names
