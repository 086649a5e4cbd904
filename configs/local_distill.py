"""Laptop smoke run of the distillation stage: no downloads, minutes on a CPU.

The student is the full Rep-MedSAM encoder at 32 x 32 (an 8 x 8 x 256 embedding), the teacher a
random ``vit_tiny`` (128 x 128 input, 8 x 8 x 256 embedding) run online in the step on the same
augmented image. It shows the machinery (teacher in the step, frozen heads, checkpoints,
plateau) rather than a useful model::

    python train.py --config configs/local_distill.py --workdir work_dirs/local_distill
"""

import ml_collections

from rep_medsam_jax.training.config import (DataSection, ModelSection, TeacherSection,
                                            TrainConfig,
                                            as_config_dict)
from rep_medsam_jax.training.optim import OptimConfig


def get_config() -> ml_collections.ConfigDict:
    return as_config_dict(TrainConfig(
        name="local_distill",
        stage="distill",
        model=ModelSection(preset="rep_medsam", image_size=32),
        data=DataSection(phantoms=(16, 0), phantom_image_size=32, validation_fraction=0.25,
                         augment="distill", flip_probability=0.5),
        teacher=TeacherSection(source="online", variant="vit_tiny", random_seed=0),
        optim=OptimConfig(learning_rate=1e-3, clip="none", trainable=("image_encoder",)),
        batch_size=8,
        total_steps=60,
        eval_every_steps=20,
        best_metric="val/mse",
        best_mode="min",
        log_every_steps=5,
    ))
