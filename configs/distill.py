"""Stage 1 of 3 (paper Table 2): distil the RepViT encoder from MedSAM ViT-B's embeddings.

5 epochs, AdamW lr 5e-4, batch 16, flips (mirrored onto the stored teacher embedding), no
colour jitter. Loss: MSE(student embedding, teacher embedding), as the authors' ``distil.py``.
Only the image encoder trains; the prompt encoder and mask decoder come from MedSAM and stay
frozen, so the validation DSC measures how well the student's embedding drives MedSAM's own
decoder.

Before: build the dataset and the teacher cache, and convert MedSAM (docs/training.md)::

    python -m input_pipeline.build --source CASES --data-dir DATA
    python -m input_pipeline.teacher_cache --dataset-dir DATA/med_sam_slices/size256/2.0.0 \\
        --split train --out CACHE/train --checkpoint medsam_vit_b.pth
    python -m input_pipeline.teacher_cache --dataset-dir DATA/med_sam_slices/size256/2.0.0 \\
        --split validation --out CACHE/validation --checkpoint medsam_vit_b.pth
    rep-medsam convert --from medsam medsam_vit_b.pth --out models/medsam_vit_b

Launch (one device)::

    python train.py --config configs/distill.py --workdir work_dirs/distill \\
        --config.data.dataset_dir=DATA/med_sam_slices/size256/2.0.0 \\
        --config.data.teacher_cache_dir=CACHE/train \\
        --config.data.eval_teacher_cache_dir=CACHE/validation \\
        --config.model.init_from=models/medsam_vit_b

The paper's data: all challenge data except CT, plus a seeded uniform 20 % of the challenge's
CT slices. Set ``SOURCES`` below (a teacher cache per source; two sources of one dataset share
its cache) and leave out ``--config.data.dataset_dir`` / ``--config.data.teacher_cache_dir``;
or give the list on the command line::

    --config.data.sources="({'dataset_dir': '$D', 'exclude_modalities': ('CT',),
        'teacher_cache_dir': 'CACHE/train'}, {'dataset_dir': '$D', 'modalities': ('CT',),
        'fraction': 0.2, 'teacher_cache_dir': 'CACHE/train'})"

Validation then uses the first source's validation split (all modalities), or
``--config.data.eval_dataset_dir``.

Without a cache, run the teacher in the step on the identically augmented image (exact, about
8x the compute of the student): ``--config.teacher.source=online
--config.teacher.model_dir=models/medsam_vit_b``.
Multi-host: add ``--coordinator HOST:PORT --num_processes N --process_id I`` on every host
(or ``--distributed_auto`` on a TPU pod slice / SLURM), see docs/training.md.
"""

import ml_collections

from rep_medsam_jax.training.config import (DataSection, DataSource, LossSection,  # noqa: F401
                                            ModelSection, TeacherSection, TrainConfig,
                                            as_config_dict)
from rep_medsam_jax.training.optim import OptimConfig


# The paper's distillation data, ready to edit (empty: data.dataset_dir as above).
SOURCES: tuple = ()
# CHALLENGE = "DATA/challenge/med_sam_slices/size256/2.0.0"
# SOURCES = (
#     DataSource(CHALLENGE, exclude_modalities=("CT",), teacher_cache_dir="CACHE/train"),
#     DataSource(CHALLENGE, modalities=("CT",), fraction=0.2, teacher_cache_dir="CACHE/train"),
# )


def get_config() -> ml_collections.ConfigDict:
    return as_config_dict(TrainConfig(
        name="distill",
        stage="distill",
        # init_from: a MODEL_DIR whose prompt encoder and mask decoder are MedSAM's.
        model=ModelSection(preset="rep_medsam", init_parts=("prompt_encoder", "mask_decoder")),
        data=DataSection(sources=SOURCES, augment="distill", flip_probability=0.5,
                         worker_count=8),
        teacher=TeacherSection(source="cache"),
        loss=LossSection(distill_weight=1.0),
        optim=OptimConfig(learning_rate=5e-4, weight_decay=0.01, clip="percentile",
                          plateau_factor=0.9, plateau_patience=5,
                          trainable=("image_encoder",)),
        batch_size=16,
        num_epochs=5,
        best_metric="val/dsc",
        best_mode="max",
        plateau_metric="val/loss",
        log_every_steps=50,
        # Bounds what a hard kill loses (an epoch of the real data takes hours).
        checkpoint_every_minutes=30,
    ))
