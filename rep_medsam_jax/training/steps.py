"""Training and evaluation steps: pure functions of (state, batch, rng), jitted once.

* :func:`distill_step` (the authors' ``distil.py``): MSE between the student encoder's
  embedding and the teacher's, taken from the batch (``teacher_embedding``, the cache) or
  computed in the same step by a ViT teacher on the identically augmented image (``online``).
  Only the image encoder runs; the heads are frozen by the optimiser (``optim.trainable``).
* :func:`seg_step` (the authors' ``train_one_gpu.py``): image + box -> mask logits and IoU;
  Dice + BCE + IoU loss with configurable weights.
* :func:`eval_step`: weighted sums of DSC, the segmentation loss terms and (when a teacher
  target exists) the distillation MSE; :func:`finalize_eval` turns summed batches into means.

A batch is a dict (B = the global batch):
  image (B, S, S, 3) float in [0, 1], or uint8 finished in the step (:func:`batch_images`:
  ``image_region`` (B, 4) and optionally ``jitter_order`` / ``jitter_factors`` (B, 4)),
  mask (B, S, S) {0, 1},
  box (B, 4) [x0, y0, x1, y1] in the S frame, optionally teacher_embedding (B, g, g, C) and
  weight (B,) (0 for padding in an evaluation batch).

BatchNorm statistics update whenever the image encoder trains (train-mode BN); a frozen
encoder runs in inference mode. ``compute_dtype="bfloat16"`` casts the float32 master
parameters and the images to bfloat16 inside the step (gradients flow back to the float32
copy; BatchNorm statistics and losses stay float32).

:func:`jit_steps` binds a model, optimiser and options and jits each step with the state
donated, optionally pinning the state replicated and the batch split over a device mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rep_medsam_jax import losses
from rep_medsam_jax.training import optim

COMPUTE_DTYPES = ("float32", "bfloat16")


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes while training, as one pytree (checkpointed whole).

    step: () int32 batches consumed; params / batch_stats: the model's variables (float32);
    opt_state: the optimiser's state (plateau scale included); rng: (2,) uint32 base key data,
    from which step k's key is ``fold_in(rng, k)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def variables(self) -> dict:
        """``{"params", "batch_stats"}`` as a model directory / ``apply`` expects."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(variables: dict, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
    """A fresh state at step 0 for model ``variables`` and optimiser ``tx``."""
    params = variables["params"]
    key_data = rng if rng.dtype == jnp.uint32 else jax.random.key_data(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=jnp.asarray(key_data, jnp.uint32))


def step_key(state: TrainState) -> jax.Array:
    """The per-step random key: fold_in(base key, step), identical after a restart."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the steps compute (static: changing it recompiles)."""

    compute_dtype: str = "float32"
    seg_loss: losses.SegLossWeights = losses.REFERENCE_SQUARED
    distill_weight: float = 1.0          # the reference's mse_loss_weight
    trainable: tuple[str, ...] = optim.MODEL_PARTS

    @property
    def dtype(self) -> jnp.dtype:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, "
                             f"got {self.compute_dtype!r}")
        return jnp.dtype(self.compute_dtype)

    @property
    def encoder_trains(self) -> bool:
        return "image_encoder" in self.trainable


class Teacher(NamedTuple):
    """An online teacher: a ViT image encoder module and its input size; its variables are
    passed to the step as an argument (so they are not baked into the compiled program)."""

    module: nn.Module
    image_size: int


def cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
    """Every floating leaf of ``tree`` as ``dtype`` (others untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


def batch_images(batch: dict, dtype: jnp.dtype) -> jax.Array:
    """(B, S, S, 3) images in [0, 1] as ``dtype``: float images as they come; uint8 images
    finished here, on the device (normalised over ``image_region`` and colour-jittered when the
    batch carries the jitter, see ``input_pipeline.device_augment``; else divided by 255)."""
    from input_pipeline.device_augment import finish_images  # noqa: PLC0415

    return finish_images(batch).astype(dtype)


def teacher_embeddings(teacher: Teacher, teacher_variables: Any, images: jax.Array,
                       dtype: jnp.dtype) -> jax.Array:
    """(B, S, S, 3) student images -> (B, g, g, C) teacher embeddings, no gradient.

    The student's S x S frame is upsampled (bicubic, clipped to [0, 1]) to the teacher's
    T x T input, so both embedding grids cover the same pixels, and any flip or jitter applied
    to the student image is seen by the teacher too.
    """
    batch_size = images.shape[0]
    size = teacher.image_size
    big = jax.image.resize(images.astype(jnp.float32), (batch_size, size, size, 3), "cubic")
    big = jnp.clip(big, 0.0, 1.0).astype(dtype)
    embedding, _ = teacher.module.apply(cast_floating(teacher_variables, dtype), big)
    return jax.lax.stop_gradient(embedding.astype(jnp.float32))


def _distill_target(batch: dict, teacher: Teacher | None, teacher_variables: Any,
                    images: jax.Array, dtype: jnp.dtype) -> jax.Array:
    if teacher is not None:
        return teacher_embeddings(teacher, teacher_variables, images, dtype)
    if "teacher_embedding" not in batch:
        raise ValueError("distillation needs batch['teacher_embedding'] (a teacher cache) "
                         "or an online teacher")
    return batch["teacher_embedding"].astype(jnp.float32)


def _apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation,
                     new_batch_stats: Any) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, batch_stats=new_batch_stats,
                         opt_state=opt_state)


def _common_metrics(state: TrainState, grads: Any, options: StepOptions) -> dict[str, jax.Array]:
    trainable = {k: v for k, v in grads.items() if k in options.trainable}
    return {"grad_norm": optax.tree.norm(trainable),
            "lr_scale": optim.plateau_state(state.opt_state).scale.astype(jnp.float32)}


def distill_step(state: TrainState, batch: dict, rng: jax.Array, teacher_variables: Any = None,
                 *, model: nn.Module, tx: optax.GradientTransformation, options: StepOptions,
                 teacher: Teacher | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One distillation step; metrics {"loss", "mse", "grad_norm", "lr_scale"}."""
    del rng                                   # the model has no stochastic layers
    dtype = options.dtype
    images = batch_images(batch, dtype)
    target = _distill_target(batch, teacher, teacher_variables, images, dtype)

    def loss_fn(params):
        variables = {"params": cast_floating(params, dtype), "batch_stats": state.batch_stats}
        (embedding, _), updated = model.apply(variables, images, train=options.encoder_trains,
                                              mutable=["batch_stats"], method="encode")
        mse = losses.distill_mse(embedding, target)
        return options.distill_weight * mse, (mse, updated["batch_stats"])

    (loss, (mse, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = _apply_gradients(state, grads, tx, batch_stats)
    metrics = {"loss": loss, "mse": mse, **_common_metrics(new_state, grads, options)}
    return new_state, metrics


def _segment(model: nn.Module, params: Any, batch_stats: Any, batch: dict, train: bool,
             dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """-> logits (B, S, S) float32, iou (B,) float32, embeddings, updated batch_stats."""
    variables = {"params": cast_floating(params, dtype), "batch_stats": batch_stats}
    images = batch_images(batch, dtype)
    boxes = batch["box"].astype(jnp.float32)
    if train:
        (logits, iou, embedding), updated = model.apply(variables, images, boxes, train=True,
                                                        mutable=["batch_stats"])
        batch_stats = updated["batch_stats"]
    else:
        logits, iou, embedding = model.apply(variables, images, boxes, train=False)
    return logits.astype(jnp.float32), iou.astype(jnp.float32), embedding, batch_stats


def seg_step(state: TrainState, batch: dict, rng: jax.Array, teacher_variables: Any = None,
             *, model: nn.Module, tx: optax.GradientTransformation, options: StepOptions,
             teacher: Teacher | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One segmentation step; metrics {"loss", "dice", "bce", "iou", "dsc", "grad_norm",
    "lr_scale"} (dsc: the batch's mean DSC of ``logits > 0``, before the update)."""
    del rng, teacher_variables, teacher
    masks = batch["mask"]

    def loss_fn(params):
        logits, iou, _, batch_stats = _segment(model, params, state.batch_stats, batch,
                                               options.encoder_trains, options.dtype)
        total, parts = losses.seg_loss(logits, iou, masks, options.seg_loss)
        parts["dsc"] = jnp.mean(losses.dice_score_per_example(logits, masks))
        return total, (parts, batch_stats)

    (_, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = _apply_gradients(state, grads, tx, batch_stats)
    return new_state, {**parts, **_common_metrics(new_state, grads, options)}


def eval_step(state: TrainState, batch: dict, teacher_variables: Any = None, *,
              model: nn.Module, options: StepOptions, teacher: Teacher | None = None
              ) -> dict[str, jax.Array]:
    """Sums over the batch, weighted by ``batch["weight"]`` (default 1): "count", "dsc",
    "dice", "bce", "iou" (per-example losses) and, with a teacher target, "mse"."""
    masks = batch["mask"]
    weights = batch.get("weight")
    weights = (jnp.ones(masks.shape[:1], jnp.float32) if weights is None
               else weights.astype(jnp.float32))
    logits, iou, embedding, _ = _segment(model, state.params, state.batch_stats, batch,
                                         train=False, dtype=options.dtype)
    per_example = {
        "dsc": losses.dice_score_per_example(logits, masks),
        "dice": losses.dice_loss_per_example(logits, masks),
        "bce": losses.bce_with_logits_per_example(logits, masks),
        "iou": losses.iou_loss_per_example(iou, logits, masks),
    }
    if teacher is not None or "teacher_embedding" in batch:
        images = batch_images(batch, options.dtype)
        target = _distill_target(batch, teacher, teacher_variables, images, options.dtype)
        per_example["mse"] = losses.distill_mse_per_example(embedding, target)
    sums = {k: jnp.sum(weights * v) for k, v in per_example.items()}
    sums["count"] = jnp.sum(weights)
    return sums


def finalize_eval(sums: dict[str, float], options: StepOptions, stage: str) -> dict[str, float]:
    """Summed eval batches -> means, plus "loss": the stage's loss on the whole split.

    For segmentation the loss is built from the split-mean terms exactly as the training loss
    is built from batch-mean terms (squared or weighted, see ``losses.seg_loss``); for
    distillation it is ``distill_weight x mse``.
    """
    count = max(float(sums["count"]), 1e-12)
    means = {k: float(v) / count for k, v in sums.items() if k != "count"}
    means["count"] = float(sums["count"])
    if stage == "distill":
        if "mse" in means:
            means["loss"] = options.distill_weight * means["mse"]
    else:
        w = options.seg_loss
        terms = [means["dice"], means["bce"], means["iou"]]
        if w.squared:
            terms = [t * t for t in terms]
        means["loss"] = w.dice * terms[0] + w.bce * terms[1] + w.iou * terms[2]
    return means


class JittedSteps(NamedTuple):
    """train(state, batch, rng) -> (state, metrics) with the state donated;
    evaluate(state, batch) -> metric sums."""

    train: Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]
    evaluate: Callable[[TrainState, dict], dict]


def jit_steps(stage: str, model: nn.Module, tx: optax.GradientTransformation,
              options: StepOptions, teacher: Teacher | None = None,
              teacher_variables: Any = None, state_sharding: Any = None,
              batch_sharding: Any = None, replicated: Any = None,
              donate: bool = True) -> JittedSteps:
    """Jit the stage's training step (``"distill"`` or ``"seg"``) and the evaluation step.

    With shardings (see ``training.sharding``) the state stays replicated and the outputs are
    pinned to it, so the compiled program is data-parallel over the mesh.
    """
    if stage not in ("distill", "seg"):
        raise ValueError(f"stage must be 'distill' or 'seg', got {stage!r}")
    step_fn = distill_step if stage == "distill" else seg_step
    train = functools.partial(step_fn, model=model, tx=tx, options=options, teacher=teacher)
    evaluate = functools.partial(eval_step, model=model, options=options, teacher=teacher)
    train_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    eval_kwargs: dict[str, Any] = {}
    if state_sharding is not None:
        train_kwargs["in_shardings"] = (state_sharding, batch_sharding, replicated, replicated)
        train_kwargs["out_shardings"] = (state_sharding, replicated)
        eval_kwargs["in_shardings"] = (state_sharding, batch_sharding, replicated)
        eval_kwargs["out_shardings"] = replicated
    train_jit = jax.jit(train, **train_kwargs)
    eval_jit = jax.jit(evaluate, **eval_kwargs)
    return JittedSteps(
        train=lambda state, batch, rng: train_jit(state, batch, rng, teacher_variables),
        evaluate=lambda state, batch: eval_jit(state, batch, teacher_variables))
