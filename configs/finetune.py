"""Stage 3 of 3 (paper Table 4): fine-tune the whole pipeline with colour jitter.

12 epochs, AdamW lr 2e-5, batch 16, torchvision ColorJitter(0.4, 0.5, 0.4, 0.2) then flips
(p = 0.7 each) and box widening by 0..5 px (the authors' ``train_one_gpu.py``); the same loss,
clipping and plateau rule as stage 2.

Starts from stage 2's best checkpoint::

    python train.py --config configs/finetune.py --workdir work_dirs/finetune \\
        --config.data.dataset_dir=DATA/med_sam_slices/size256/2.0.0 \\
        --config.model.init_from=work_dirs/pipeline

The paper's data: the challenge data without its CT plus CT from supplementary datasets.
Set ``SOURCES`` below and leave out ``--config.data.dataset_dir``, or give the list on the
command line::

    --config.data.sources="({'dataset_dir': '$CHALLENGE', 'exclude_modalities': ('CT',)},
        {'dataset_dir': '$EXTRA_CT'})"

Validation then uses the first source's validation split (all modalities), or
``--config.data.eval_dataset_dir``.

The result, ``work_dirs/finetune/model``, is a MODEL_DIR: ``rep-medsam export`` and
``rep-medsam predict`` take it directly. Multi-host: see docs/training.md.
"""

import ml_collections

from rep_medsam_jax.training.config import (DataSection, DataSource, LossSection,  # noqa: F401
                                            ModelSection, TrainConfig, as_config_dict)
from rep_medsam_jax.training.optim import OptimConfig


# The paper's fine-tuning data, ready to edit (empty: data.dataset_dir as above). Each
# supplementary CT set is built on its own (python -m input_pipeline.build --source ...).
SOURCES: tuple = ()
# SOURCES = (
#     DataSource("DATA/challenge/med_sam_slices/size256/2.0.0", exclude_modalities=("CT",)),
#     DataSource("DATA/extra_ct/med_sam_slices/size256/2.0.0"),
# )


def get_config() -> ml_collections.ConfigDict:
    return as_config_dict(TrainConfig(
        name="finetune",
        stage="seg",
        model=ModelSection(preset="rep_medsam"),
        data=DataSection(sources=SOURCES, augment="finetune", flip_probability=0.7,
                         box_shift=5, worker_count=8),
        loss=LossSection(dice=1.0, bce=1.0, iou=1.0, squared=True),
        optim=OptimConfig(learning_rate=2e-5, weight_decay=0.01, clip="percentile",
                          plateau_factor=0.9, plateau_patience=5),
        batch_size=16,
        num_epochs=12,
        best_metric="val/dsc",
        best_mode="max",
        log_every_steps=50,
        # Bounds what a hard kill loses (an epoch of the real data takes hours).
        checkpoint_every_minutes=30,
    ))
