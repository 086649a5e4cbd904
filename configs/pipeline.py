"""Stage 2 of 3 (paper Table 3): train the whole pipeline (encoder, prompt encoder, decoder).

8 epochs, AdamW lr 3e-4 (weight decay 0.01), batch 16, flips (p = 0.7 each, as the authors'
``train_one_gpu.py``), box sides widened by 0..5 px, no colour jitter. Loss: the reference's
Dice^2 + BCE^2 + IoU_MSE^2; gradient clipping at the 90th percentile of past norms;
reduce-on-plateau (factor 0.9, patience 5) on the validation loss, checked once per epoch.

Starts from stage 1's best checkpoint::

    python train.py --config configs/pipeline.py --workdir work_dirs/pipeline \\
        --config.data.dataset_dir=DATA/med_sam_slices/size256/2.0.0 \\
        --config.model.init_from=work_dirs/distill

Multi-host: add ``--coordinator HOST:PORT --num_processes N --process_id I`` on every host
(or ``--distributed_auto``), see docs/training.md.
"""

import ml_collections

from rep_medsam_jax.training.config import (DataSection, LossSection, ModelSection, TrainConfig,
                                            as_config_dict)
from rep_medsam_jax.training.optim import OptimConfig


def get_config() -> ml_collections.ConfigDict:
    return as_config_dict(TrainConfig(
        name="pipeline",
        stage="seg",
        model=ModelSection(preset="rep_medsam"),
        data=DataSection(augment="pipeline", flip_probability=0.7, box_shift=5, worker_count=8),
        loss=LossSection(dice=1.0, bce=1.0, iou=1.0, squared=True),
        optim=OptimConfig(learning_rate=3e-4, weight_decay=0.01, clip="percentile",
                          plateau_factor=0.9, plateau_patience=5),
        batch_size=16,
        num_epochs=8,
        best_metric="val/dsc",
        best_mode="max",
        log_every_steps=50,
        # Bounds what a hard kill loses (an epoch of the real data takes hours).
        checkpoint_every_minutes=30,
    ))
