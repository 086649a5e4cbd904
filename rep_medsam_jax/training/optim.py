"""The optimiser: AdamW on the trainable parts, optional clipping and accumulation, and a
learning-rate scale from ``optax.contrib.reduce_on_plateau`` driven by the validation loss.

Per training step the update is (the plateau transform comes after AdamW, since it scales the
finished updates)::

    multi_transform({trainable: clip -> adamw, frozen: set_to_zero})  ->  x plateau scale

wrapped in ``optax.MultiSteps`` when gradients are accumulated over several batches.

The plateau scale must move only when a validation loss is known (once per evaluation), not on
every batch. So the training chain holds optax's own ``ReduceLROnPlateauState`` but only *reads*
its ``scale`` (:func:`scale_by_plateau`); after each evaluation :func:`apply_plateau` runs optax's
real ``reduce_on_plateau`` update on that state with ``value=validation_loss``
(accumulation_size 1). The state lives in the optimiser state, so it is checkpointed with it.

PyTorch's ``ReduceLROnPlateau(patience=p)`` lowers the rate when the number of bad epochs
*exceeds* p; optax's when it *reaches* its patience. ``OptimConfig.plateau_patience`` has
PyTorch's meaning (the reference's 5) and is passed to optax as p + 1. PyTorch's default
threshold (1e-4, relative) is optax's ``rtol``.

The reference (the authors' ``train_one_gpu.py``) clips the global gradient norm at the 90th
percentile of every norm seen so far (current step included, NumPy linear interpolation), with
PyTorch's ``clip_grad_norm_`` coefficient ``min(1, max_norm / (norm + 1e-6))``.
:func:`clip_by_history_percentile` does the same over the last ``clip_history`` steps (a ring
buffer; the reference's history is unbounded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import ReduceLROnPlateauState

MODEL_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
CLIP_MODES = ("none", "global_norm", "percentile")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW, clipping, accumulation, plateau schedule and which parts train.

    Defaults are the reference's fine-tuning set-up (``train_one_gpu.py``) except the learning
    rate, which each stage config sets.
    """

    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip: str = "percentile"            # "none" | "global_norm" | "percentile"
    clip_norm: float = 1.0              # "global_norm": the fixed max norm
    clip_percentile: float = 90.0       # "percentile": the reference's adaptive max norm
    clip_history: int = 65536
    accumulation_steps: int = 1         # > 1: optax.MultiSteps over that many batches
    plateau_factor: float = 0.9
    plateau_patience: int = 5           # PyTorch meaning (see the module docstring)
    plateau_cooldown: int = 0
    plateau_rtol: float = 1e-4
    plateau_min_scale: float = 0.0
    trainable: tuple[str, ...] = MODEL_PARTS

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        need(self.learning_rate > 0, f"optim.learning_rate must be > 0, got {self.learning_rate}")
        need(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
        need(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        need(self.clip in CLIP_MODES, f"optim.clip must be one of {CLIP_MODES}, got {self.clip!r}")
        need(self.clip_norm > 0, f"optim.clip_norm must be > 0, got {self.clip_norm}")
        need(0 < self.clip_percentile <= 100,
             f"optim.clip_percentile must be in (0, 100], got {self.clip_percentile}")
        need(self.clip_history >= 1, f"optim.clip_history must be >= 1, got {self.clip_history}")
        need(self.accumulation_steps >= 1,
             f"optim.accumulation_steps must be >= 1, got {self.accumulation_steps}")
        need(0 < self.plateau_factor < 1,
             f"optim.plateau_factor must be in (0, 1), got {self.plateau_factor}")
        need(self.plateau_patience >= 0,
             f"optim.plateau_patience must be >= 0, got {self.plateau_patience}")
        need(self.plateau_cooldown >= 0,
             f"optim.plateau_cooldown must be >= 0, got {self.plateau_cooldown}")
        need(0 < self.plateau_rtol <= 1, f"optim.plateau_rtol must be in (0, 1], got "
                                         f"{self.plateau_rtol}")
        need(len(self.trainable) > 0, "optim.trainable is empty: nothing would train")
        unknown = set(self.trainable) - set(MODEL_PARTS)
        need(not unknown, f"optim.trainable names unknown parts {sorted(unknown)}; "
                          f"choose from {MODEL_PARTS}")


# --------------------------------------------------------------------------------------------
# Gradient clipping at a percentile of the norm history (the reference's rule)
# --------------------------------------------------------------------------------------------

class PercentileClipState(NamedTuple):
    """norms: (H,) float32 ring buffer of past global norms (NaN = not yet filled);
    count: () int32 steps seen."""

    norms: jax.Array
    count: jax.Array


def clip_by_history_percentile(percentile: float = 90.0,
                               history: int = 65536) -> optax.GradientTransformation:
    """Scale the updates by ``min(1, q / (norm + 1e-6))``, q = the ``percentile``-th percentile
    of the last ``history`` global norms including this step's."""

    def init_fn(params: Any) -> PercentileClipState:
        del params
        return PercentileClipState(jnp.full((history,), jnp.nan, jnp.float32),
                                   jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates).astype(jnp.float32)
        norms = state.norms.at[state.count % history].set(norm)
        max_norm = jnp.nanpercentile(norms, percentile)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        updates = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
        return updates, PercentileClipState(norms, state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Plateau schedule
# --------------------------------------------------------------------------------------------

def plateau_transform(config: OptimConfig) -> optax.GradientTransformationExtraArgs:
    """optax's reduce_on_plateau with the config's factor / patience (PyTorch meaning)."""
    return optax.contrib.reduce_on_plateau(
        factor=config.plateau_factor, patience=config.plateau_patience + 1,
        rtol=config.plateau_rtol, atol=0.0, cooldown=config.plateau_cooldown,
        accumulation_size=1, min_scale=config.plateau_min_scale)


def scale_by_plateau(config: OptimConfig) -> optax.GradientTransformation:
    """Multiply the updates by the plateau state's ``scale``; never changes that state."""
    plateau = plateau_transform(config)

    def update_fn(updates, state: ReduceLROnPlateauState, params=None):
        del params
        return jax.tree.map(lambda g: (state.scale * g).astype(g.dtype), updates), state

    return optax.GradientTransformation(plateau.init, update_fn)


def _is_plateau_state(node: Any) -> bool:
    return isinstance(node, ReduceLROnPlateauState)


def apply_plateau(opt_state: Any, value: jax.Array | float, config: OptimConfig) -> Any:
    """The optimiser state after feeding ``value`` (a validation loss) to the plateau rule."""
    plateau = plateau_transform(config)

    def step(node: Any) -> Any:
        if not _is_plateau_state(node):
            return node
        _, new_state = plateau.update(jnp.zeros(()), node, value=jnp.asarray(value, jnp.float32))
        return new_state

    return jax.tree_util.tree_map(step, opt_state, is_leaf=_is_plateau_state)


def plateau_state(opt_state: Any) -> ReduceLROnPlateauState:
    """The plateau state inside an optimiser state built by :func:`make_optimizer`."""
    found = [n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_plateau_state)
             if _is_plateau_state(n)]
    if len(found) != 1:
        raise ValueError(f"expected one plateau state in the optimiser state, found {len(found)}")
    return found[0]


def learning_rate(opt_state: Any, config: OptimConfig) -> jax.Array:
    """The current effective learning rate: base rate x plateau scale."""
    return config.learning_rate * plateau_state(opt_state).scale


# --------------------------------------------------------------------------------------------
# The whole optimiser
# --------------------------------------------------------------------------------------------

# Parameters that are buffers in the reference (loaded, never learned): always frozen, so that
# weight decay does not shrink them either.
BUFFER_NAMES = ("positional_encoding_gaussian_matrix",)


def part_labels(params: dict, trainable: Sequence[str]) -> dict:
    """The same tree as ``params`` with every leaf labelled "trainable" or "frozen" by its
    top-level part (image_encoder / prompt_encoder / mask_decoder); buffers are frozen."""
    def label(path, _leaf) -> str:
        part = path[0].key
        names = {getattr(entry, "key", None) for entry in path}
        if part not in trainable or names & set(BUFFER_NAMES):
            return "frozen"
        return "trainable"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: OptimConfig, params: dict) -> optax.GradientTransformation:
    """The per-step optimiser for ``params`` (``{"image_encoder": ..., ...}``)."""
    config.validate()
    absent = [p for p in config.trainable if p not in params]
    if absent:
        raise ValueError(f"optim.trainable names {absent}, which this model does not have "
                         f"(it has {sorted(params)})")
    trainable: list[optax.GradientTransformation] = []
    if config.clip == "global_norm":
        trainable.append(optax.clip_by_global_norm(config.clip_norm))
    elif config.clip == "percentile":
        trainable.append(clip_by_history_percentile(config.clip_percentile, config.clip_history))
    trainable.append(optax.adamw(config.learning_rate, b1=config.b1, b2=config.b2,
                                 eps=config.eps, weight_decay=config.weight_decay))
    labels = part_labels(params, config.trainable)
    tx = optax.chain(
        optax.multi_transform({"trainable": optax.chain(*trainable),
                               "frozen": optax.set_to_zero()}, labels),
        scale_by_plateau(config))
    if config.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accumulation_steps)
    return tx
