"""The demo's distillation stage (``make demo``): the tiny student learns a small ViT teacher's
embeddings on built-in phantoms at 64 x 64, online (teacher in the step, same flipped image).

No pretrained teacher exists offline, so the teacher is a randomly initialised ``vit_demo``:
this shows the machinery (and the MSE falling), not a useful teacher. With a converted MedSAM
(``rep-medsam convert --from medsam``) use configs/distill.py instead.

    python train.py --config configs/demo_distill.py --workdir demo_output/train/distill
"""

import ml_collections

from rep_medsam_jax.training.config import (DataSection, ModelSection, TeacherSection,
                                            TrainConfig,
                                            as_config_dict)
from rep_medsam_jax.training.optim import OptimConfig


def get_config() -> ml_collections.ConfigDict:
    return as_config_dict(TrainConfig(
        name="demo_distill",
        stage="distill",
        model=ModelSection(preset="rep_medsam_tiny", image_size=64),
        data=DataSection(phantoms=(40, 0), phantom_image_size=64, validation_fraction=0.2,
                         phantom_modalities=("CT", "MR", "US", "Endoscopy", "Dermoscopy"),
                         augment="distill", flip_probability=0.5),
        teacher=TeacherSection(source="online", variant="vit_demo", random_seed=0),
        optim=OptimConfig(learning_rate=2e-3, clip="none", trainable=("image_encoder",)),
        batch_size=8,
        total_steps=120,
        eval_every_steps=40,
        best_metric="val/mse",
        best_mode="min",
        log_every_steps=10,
    ))
