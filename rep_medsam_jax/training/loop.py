"""The training loop: ``train_and_evaluate(config, workdir)`` runs one stage end to end.

It owns everything around the pure steps (``training.steps``): data loaders, device placement,
evaluation, the plateau schedule, checkpoints, logging and the final export.

Order of one iteration (step k -> k + 1)::

    batch = next(train iterator)            # this process's share of the global batch
    state, metrics = train_step(state, batch, fold_in(key, k))
    every log_every_steps:   progress bar, metrics.jsonl, TensorBoard
    every eval_every_steps:  evaluate -> plateau update of the optimiser state (val loss)
    every checkpoint_every_steps (and after each evaluation, every checkpoint_every_minutes,
    and at the end):         save state + data-iterator state (+ metrics)
    on SIGTERM / SIGINT:     save this step and return (``training.preemption``; every process
                             stops after the same step)

Restart: if ``WORKDIR/checkpoints`` has a finished step, the state, the data iterator and the
metrics log are brought back to it and the run continues; because the step key is
``fold_in(key, step)`` and the iterator is restored, the continued run computes exactly what the
uninterrupted run would have. A run stopped by a signal at an evaluation step saves before
evaluating (so it exits within seconds) and evaluates first thing when resumed.

``WORKDIR`` after a run::

    checkpoints/        orbax steps (last N + best)
    model/              the final weights as a MODEL_DIR (``rep-medsam export`` / ``predict``)
    metrics.jsonl       one line per log / evaluation
    tensorboard/        event files
    learning_curves.png
    config.json         the resolved config of the run
    data/               built-in phantom dataset (when ``data.phantoms`` is set)

``WORKDIR``, ``data.dataset_dir``, the teacher caches and ``model.init_from`` may be URLs
(``gs://bucket/...``; see ``rep_medsam_jax.io.storage`` and docs/training.md "Cloud storage").
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rep_medsam_jax.io.storage import absolute, as_path, is_url
from rep_medsam_jax.models.config import REPVIT_VARIANTS, VIT_VARIANTS, ModelConfig
from rep_medsam_jax.models.medsam_lite import build_model, init_variables
from rep_medsam_jax.training import optim
from rep_medsam_jax.training import sharding as sharding_lib
from rep_medsam_jax.training.checkpoint import (Checkpointer, load_checkpoint_variables,
                                                select_step)
from rep_medsam_jax.training.config import (ConfigError, TrainConfig, data_mixture,
                                            init_source_kind, resolve_model_config, validate)
from rep_medsam_jax.training.logger import MetricWriter, plot_learning_curves
from rep_medsam_jax.training.preemption import HostAgreement, StopSignals
from rep_medsam_jax.training.steps import (StepOptions, Teacher, TrainState, create_train_state,
                                           finalize_eval, jit_steps)

_LOG = logging.getLogger(__name__)
# What crosses to the device: uint8 images with their valid region and the colour jitter drawn
# on the host (the step finishes the images, see input_pipeline.device_augment).
BATCH_KEYS = ("image", "image_region", "jitter_order", "jitter_factors", "mask", "box",
              "teacher_embedding")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def prepare_dataset(config: TrainConfig, workdir: Path) -> Path:
    """The built dataset's folder: ``data.dataset_dir``, the first of ``data.sources`` (the
    mixture itself comes from ``config.data_mixture``), or phantoms built into WORKDIR/data
    (process 0 builds, the others wait; building is resumable and reuses a finished build).
    With a URL WORKDIR the phantom cases are written to a local temporary folder (image writers
    need files) and only the built dataset goes to WORKDIR/data."""
    data = config.data
    if data.sources:
        return as_path(data.sources[0].dataset_dir)
    if not data.phantoms:
        return as_path(data.dataset_dir)
    from input_pipeline.phantoms import MODALITIES_2D, write_phantom_dataset  # noqa: PLC0415
    from input_pipeline.remote_build import build_dataset_at  # noqa: PLC0415
    from input_pipeline.tfds_builder import BuildOptions  # noqa: PLC0415

    root = workdir / "data"
    options = BuildOptions(image_size=data.phantom_image_size,
                           validation_fraction=data.validation_fraction, split_seed=data.seed)
    if jax.process_index() == 0:
        local = Path(tempfile.mkdtemp(prefix="rep-medsam-phantoms-")) if is_url(root) else None
        cases = (local or root) / "phantoms"
        try:
            if not (cases / "inputs").is_dir():
                write_phantom_dataset(cases, n2d=data.phantoms[0], n3d=data.phantoms[1],
                                      seed=data.phantom_seed,
                                      modalities_2d=data.phantom_modalities or MODALITIES_2D)
            result = build_dataset_at(cases, root / "tfds", options, log=_LOG.debug)
        finally:
            if local is not None:
                shutil.rmtree(local, ignore_errors=True)
        dataset_dir = result.dataset_dir
    _sync("phantom dataset built")
    if jax.process_index() != 0:
        dataset_dir = build_dataset_at(root / "phantoms", root / "tfds", options,
                                       log=_LOG.debug).dataset_dir      # reuses the finished build
    return as_path(dataset_dir)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def augment_config(config: TrainConfig):
    """The data section's augmentation name -> an ``input_pipeline.augment.AugmentConfig``."""
    from input_pipeline.augment import AugmentConfig  # noqa: PLC0415

    data = config.data
    if data.augment == "none":
        return None
    return AugmentConfig(flip_probability=data.flip_probability,
                         color_jitter=data.augment == "finetune",
                         box_shift=0 if data.augment == "distill" else data.box_shift)


def make_loaders(config: TrainConfig, dataset_dir: Path, per_process_batch: int,
                 log: Callable[[str], None] | None = None):
    """(train loader, a function making a fresh one-pass evaluation iterator, train size,
    evaluation size). Every process reads its rows of the same global batches.

    Training reads ``dataset_dir``'s train split, or the mixture of ``data.sources``;
    evaluation reads the eval split of ``data.eval_dataset_dir``, else of ``dataset_dir``
    (with sources: the first source's dataset, every object, no fraction or filter)."""
    from input_pipeline.loader import ExampleSource, make_loader  # noqa: PLC0415
    from input_pipeline.mixture import (describe_table, mixture_table,  # noqa: PLC0415
                                        read_indexes)

    data = config.data
    from_cache = config.stage == "distill" and config.teacher.source == "cache"
    common = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                  worker_count=data.worker_count)
    common["device_images"] = True
    if data.sources:
        train_data, split, cache = data_mixture(config, teacher_caches=from_cache), None, None
    else:
        train_data, split = dataset_dir, data.train_split
        cache = (data.teacher_cache_dir or None) if from_cache else None
    train = make_loader(train_data, split, batch_size=per_process_batch,
                        seed=data.seed, augment=augment_config(config), shuffle=True,
                        num_epochs=None, teacher_cache_dir=cache, sampling=data.sampling,
                        **common)
    # An epoch: every slice once (sampling "slice") or every object once ("object"); over a
    # mixture, every row of its table once. The evaluation scores every object of the split.
    if data.sources:
        indexes = read_indexes(train_data)
        table = mixture_table(train_data, data.sampling, indexes)
        train_size = len(table)
        for line in describe_table(train_data, table, indexes):
            (log or _LOG.info)(line)
    else:
        train_size = len(ExampleSource(dataset_dir, data.train_split, sampling=data.sampling))
    eval_dir = Path(data.eval_dataset_dir) if data.eval_dataset_dir else dataset_dir
    eval_size = len(ExampleSource(eval_dir, data.eval_split, sampling="object"))
    eval_cache = data.eval_teacher_cache_dir or None if config.stage == "distill" else None

    def eval_iterator() -> Iterator[dict]:
        loader = make_loader(eval_dir, data.eval_split, batch_size=per_process_batch,
                             seed=data.seed, augment=None, shuffle=False, num_epochs=1,
                             drop_remainder=False, teacher_cache_dir=eval_cache,
                             sampling="object", **common)
        return iter(loader)

    return train, eval_iterator, train_size, eval_size


def prefetch_to_device(iterator: Iterator[dict], mesh) -> Iterator[tuple[dict, Any]]:
    """(device batch, the data iterator's state after it), with the next batch already on its
    way to the device while the current step runs. The state is what a checkpoint taken after
    that batch's step must hold, whatever has been read ahead."""
    ahead: collections.deque = collections.deque()

    def fetch() -> None:
        batch = select_batch(next(iterator))
        ahead.append((sharding_lib.shard_batch(batch, mesh), iterator.get_state()))

    fetch()
    while True:
        fetch()
        yield ahead.popleft()


def select_batch(batch: dict, per_process_batch: int | None = None) -> dict[str, np.ndarray]:
    """The arrays the steps use; a short (last evaluation) batch is zero-padded to
    ``per_process_batch`` with ``weight`` 0 for the padding."""
    selected = {k: np.asarray(batch[k]) for k in BATCH_KEYS if k in batch}
    if per_process_batch is None:
        return selected
    count = selected["image"].shape[0]
    weight = np.zeros((per_process_batch,), np.float32)
    weight[:count] = 1.0
    if count < per_process_batch:
        selected = {k: np.concatenate([v, np.zeros((per_process_batch - count,) + v.shape[1:],
                                                   v.dtype)]) for k, v in selected.items()}
    selected["weight"] = weight
    return selected


# --------------------------------------------------------------------------------------------
# Model, teacher and initial weights
# --------------------------------------------------------------------------------------------

def _merge_parts(fresh: dict, loaded: dict, parts: tuple[str, ...], where: str) -> dict:
    """``fresh`` variables with ``parts`` replaced by ``loaded``'s (shapes must agree)."""
    merged = {"params": dict(fresh["params"]), "batch_stats": dict(fresh.get("batch_stats", {}))}
    for collection in ("params", "batch_stats"):
        for part in parts:
            if part not in fresh.get(collection, {}):
                continue
            source = loaded.get(collection, {}).get(part)
            if source is None:
                raise ConfigError(f"{where} has no {collection}/{part}")
            want = jax.tree_util.tree_structure(fresh[collection][part])
            have = jax.tree_util.tree_structure(source)
            shapes_ok = want == have and all(
                np.shape(a) == np.shape(b) for a, b in zip(
                    jax.tree_util.tree_leaves(fresh[collection][part]),
                    jax.tree_util.tree_leaves(source)))
            if not shapes_ok:
                raise ConfigError(f"{where}: {collection}/{part} does not fit this model "
                                  "(another variant?)")
            merged[collection][part] = jax.tree.map(
                lambda x, like: np.asarray(x, np.asarray(like).dtype) if hasattr(like, "dtype")
                else np.asarray(x), source, fresh[collection][part])
    return merged


def load_init_variables(source: Path) -> dict:
    """``{"params", "batch_stats"}`` of a MODEL_DIR, or of a WORKDIR's best (else latest)
    checkpoint, as NumPy."""
    if init_source_kind(source) == "model_dir":
        from rep_medsam_jax.model_dir import load_model_dir  # noqa: PLC0415

        config, variables = load_model_dir(source)
        if config.deployed:
            raise ConfigError(f"{source} holds a folded (deployed) model; training needs the "
                              "unfolded training form")
        return variables
    checkpoints = source / "checkpoints"
    return load_checkpoint_variables(checkpoints, select_step(checkpoints, "best"))


def make_teacher(config: TrainConfig, model_config: ModelConfig) -> tuple[Teacher | None, Any]:
    """The online teacher and its variables (None, None for a cached teacher or seg)."""
    if config.stage != "distill" or config.teacher.source != "online":
        return None, None
    from input_pipeline.teacher_cache import TeacherCacheError, load_teacher  # noqa: PLC0415
    from rep_medsam_jax.models.vit import ViTImageEncoder  # noqa: PLC0415

    section = config.teacher
    if not section.model_dir and section.variant not in VIT_VARIANTS:
        raise ConfigError(f"teacher.variant {section.variant!r} unknown; known: "
                          f"{sorted(VIT_VARIANTS)}")
    try:
        loaded = load_teacher(model_dir=section.model_dir or None, variant=section.variant,
                              random_seed=section.random_seed)
    except TeacherCacheError as err:
        raise ConfigError(f"teacher.model_dir: {err}") from None
    vit = loaded.config
    student_channels = REPVIT_VARIANTS[model_config.encoder_variant].neck_channels
    if (vit.grid_size, vit.out_chans) != (model_config.embedding_size, student_channels):
        raise ConfigError(
            f"teacher embedding {vit.grid_size}x{vit.grid_size}x{vit.out_chans} does not match "
            f"the student's {model_config.embedding_size}x{model_config.embedding_size}x"
            f"{student_channels}")
    return Teacher(ViTImageEncoder(vit), vit.img_size), loaded.variables


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunSummary:
    """What a call to :func:`train_and_evaluate` did."""

    workdir: Path
    start_step: int
    final_step: int
    total_steps: int
    last_eval: dict[str, float]
    model_dir: Path | None
    seconds: float
    stopped_by: str | None = None      # the signal that stopped the run early (e.g. "SIGTERM")


def _schedule(config: TrainConfig, steps_per_epoch: int) -> tuple[int, int, int]:
    total = config.total_steps or max(1, int(round(config.num_epochs * steps_per_epoch)))
    eval_every = config.eval_every_steps or steps_per_epoch
    checkpoint_every = config.checkpoint_every_steps or eval_every
    return total, eval_every, checkpoint_every


def evaluate(steps, state: TrainState, eval_iterator: Callable[[], Iterator[dict]],
             mesh, per_process_batch: int, options: StepOptions, stage: str,
             max_batches: int = 0, num_batches: int | None = None) -> dict[str, float]:
    """One pass over the evaluation split -> {"val/<metric>": mean}.

    num_batches: the global batch count (all processes must run the same number of steps); a
    process whose rows of the last global batch are missing feeds a zero-weight batch.
    """
    totals: dict[str, float] = {}
    iterator = eval_iterator()
    template = None
    number = 0
    while num_batches is None or number < num_batches:
        if max_batches and number >= max_batches:
            break
        batch = next(iterator, None)
        if batch is None:
            if num_batches is None:
                break
            if template is None:
                raise ConfigError("this process has no validation example: the validation "
                                  "split is smaller than the processes' share of one batch")
            batch = {k: v[:0] for k, v in template.items()}
        template = batch
        number += 1
        device_batch = sharding_lib.shard_batch(select_batch(batch, per_process_batch), mesh)
        sums = sharding_lib.to_host(steps.evaluate(state, device_batch))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    if not totals:
        return {}
    return {f"val/{k}": v for k, v in finalize_eval(totals, options, stage).items()}


def train_and_evaluate(config: TrainConfig, workdir: str | Path, *,
                       stop_after_steps: int | None = None,
                       log: Callable[[str], None] | None = None,
                       clock: Callable[[], float] = time.monotonic) -> RunSummary:
    """Run (or resume) one training stage in ``workdir``.

    stop_after_steps: return after this many steps *in this call* without a final save, as if
    the process had been stopped there (for time-boxed jobs and the restart tests); the next
    call resumes from the last checkpoint.
    clock: seconds, read once per step for ``checkpoint_every_minutes`` (a test passes a fake).
    SIGTERM / SIGINT while running: the step in flight finishes, is saved, and the call returns
    (``RunSummary.stopped_by``).
    """
    with StopSignals() as signals:
        return _train_and_evaluate(config, workdir, stop_after_steps, log, clock, signals)


def _train_and_evaluate(config: TrainConfig, workdir: str | Path, stop_after_steps: int | None,
                        log: Callable[[str], None] | None, clock: Callable[[], float],
                        signals: StopSignals) -> RunSummary:
    started = time.time()
    workdir = absolute(workdir)
    say = log or (lambda message: print(message, flush=True))
    primary = jax.process_index() == 0
    mesh = sharding_lib.make_mesh()
    validate(config, workdir, device_count=mesh.devices.size, process_count=jax.process_count())
    per_process_batch = sharding_lib.check_batch_size(config.batch_size, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    if primary:
        (workdir / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")

    model_config = resolve_model_config(config)
    model = build_model(model_config)
    dataset_dir = prepare_dataset(config, workdir)
    train_loader, eval_iterator, train_size, eval_size = make_loaders(
        config, dataset_dir, per_process_batch, log=say if primary else lambda message: None)
    steps_per_epoch = train_size // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"the training data has {train_size} examples: fewer than one "
                          f"batch of {config.batch_size}; lower batch_size")
    total_steps, eval_every, checkpoint_every = _schedule(config, steps_per_epoch)
    teacher, teacher_variables = make_teacher(config, model_config)

    replicated = sharding_lib.replicated_sharding(mesh)
    data_sharding = sharding_lib.batch_sharding(mesh)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, state_rng = jax.random.split(rng)
    size = model_config.image_size
    abstract_variables = jax.eval_shape(
        model.init, init_rng, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, 4), jnp.float32))
    tx = optim.make_optimizer(config.optim, abstract_variables["params"])
    options = StepOptions(compute_dtype=config.compute_dtype,
                          seg_loss=config.loss.seg_weights(),
                          distill_weight=config.loss.distill_weight,
                          trainable=config.optim.trainable)
    checkpointer = Checkpointer(workdir / "checkpoints", keep_last=config.keep_checkpoints,
                                best_metric=config.best_metric or None,
                                best_mode=config.best_mode,
                                async_save=config.async_checkpoints)
    train_iterator = iter(train_loader)
    start_step = checkpointer.latest_step()
    last_eval: dict[str, float] = {}
    restored_meta: dict[str, Any] = {}
    if start_step is not None:
        abstract_state = jax.eval_shape(
            lambda v: create_train_state(v, tx, state_rng), abstract_variables)
        abstract_state = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
            abstract_state)
        state, data_state, restored_meta = checkpointer.restore(start_step, abstract_state)
        train_iterator.set_state(data_state)
        last_eval = {k: v for k, v in restored_meta.get("metrics", {}).items()
                     if k.startswith("val/")}
        say(f"resumed from {workdir / 'checkpoints' / str(start_step)}")
    else:
        start_step = 0
        variables = init_variables(model_config, config.seed)
        if config.model.init_from:
            loaded = load_init_variables(as_path(config.model.init_from))
            variables = _merge_parts(variables, loaded, config.model.init_parts,
                                     config.model.init_from)
            say(f"initialised {', '.join(config.model.init_parts)} from "
                f"{config.model.init_from}")
        variables = sharding_lib.replicate(variables, mesh)
        state = jax.jit(lambda v: create_train_state(v, tx, state_rng),
                        out_shardings=replicated)(variables)
    if teacher_variables is not None:
        teacher_variables = sharding_lib.replicate(teacher_variables, mesh)
    steps = jit_steps(config.stage, model, tx, options, teacher, teacher_variables,
                      state_sharding=replicated, batch_sharding=data_sharding,
                      replicated=replicated)

    writer = MetricWriter(workdir, enabled=primary, resume_step=start_step)
    meta = {"model": model_config.to_json(), "stage": config.stage, "config": config.to_json(),
            "dataset_dir": str(dataset_dir), "process_count": jax.process_count()}
    # Step k's key is fold_in(the state's key, k): the key is checkpointed with the state.
    base_key = jax.random.wrap_key_data(sharding_lib.to_host(state.rng))
    progress = _progress_bar(config, total_steps, start_step, enabled=primary)
    say(f"{config.name}: stage {config.stage}, {total_steps} steps ({steps_per_epoch} per "
        f"epoch, batch {config.batch_size} over {mesh.devices.size} device(s), "
        f"{jax.process_count()} process(es)), from step {start_step}")

    apply_plateau = jax.jit(lambda opt_state, value: optim.apply_plateau(
        opt_state, value, config.optim), out_shardings=replicated)
    pending: list[dict] = []          # device metrics not yet fetched
    window: list[dict] = []           # fetched metrics of the steps since the last log line
    window_start = time.time()
    # Training losses since the last evaluation: the plateau's fallback signal; checkpointed
    # so that a restart feeds the plateau exactly what an uninterrupted run would.
    train_losses: list[float] = list(restored_meta.get("train_losses_since_eval", []))
    step = start_step
    steps_this_call = 0

    def flush() -> None:
        """Fetch the pending device metrics (one transfer, not one per step)."""
        fetched = [{k: float(v) for k, v in m.items()} for m in sharding_lib.to_host(pending)]
        train_losses.extend(m["loss"] for m in fetched)
        window.extend(fetched)
        pending.clear()

    def run_evaluation() -> None:
        """Evaluate, feed the plateau rule and log (at an evaluation step)."""
        nonlocal last_eval, state
        flush()
        last_eval = evaluate(steps, state, eval_iterator, mesh, per_process_batch,
                             options, config.stage, config.eval_max_batches,
                             num_batches=-(-eval_size // config.batch_size))
        plateau_value = last_eval.get(config.plateau_metric)
        if plateau_value is None and train_losses:
            # No validation loss (e.g. distillation without a validation cache): the
            # mean training loss since the last evaluation, as the reference does.
            plateau_value = float(np.mean(train_losses))
        if plateau_value is not None:
            state = state.replace(opt_state=apply_plateau(state.opt_state, plateau_value))
        train_losses.clear()
        writer.write(step, last_eval)
        if primary:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if k != "val/count")
            progress.write(f"step {step}: {shown}")

    def log_window() -> None:
        nonlocal window_start
        flush()
        if not window:
            return
        means = {f"train/{k}": float(np.mean([m[k] for m in window])) for k in window[0]}
        means["train/lr"] = config.optim.learning_rate * means.pop("train/lr_scale")
        elapsed = max(time.time() - window_start, 1e-9)
        means["train/images_per_second"] = len(window) * config.batch_size / elapsed
        writer.write(step, means)
        progress.update(len(window))
        progress.set_postfix(loss=f"{means['train/loss']:.4f}",
                             img_s=f"{means['train/images_per_second']:.1f}")
        window.clear()
        window_start = time.time()

    def save(evaluated: bool, eval_pending: bool = False) -> None:
        flush()
        checkpointer.save(step, state, data_state,
                          {**meta, "train_losses_since_eval": train_losses,
                           "eval_pending": eval_pending},
                          metrics=last_eval if evaluated else None)
        writer.sync()            # a URL WORKDIR's metrics, uploaded with each checkpoint

    # Every process decides (stop, save now) together, see training.preemption.
    agreement = HostAgreement(mesh, count=2)
    save_interval = config.checkpoint_every_minutes * 60.0
    last_save = clock()
    stopped_by = None
    data_state = train_iterator.get_state()          # after the last batch trained on
    device_batches = prefetch_to_device(train_iterator, mesh)
    try:
        if restored_meta.get("eval_pending"):
            # The evaluation a signal postponed; its step is saved again with the metrics (and
            # the plateau update), as the uninterrupted run saved it.
            run_evaluation()
            checkpointer.delete(step)
            save(evaluated=True)
        while step < total_steps:
            batch, data_state = next(device_batches)
            state, metrics = steps.train(state, batch, jax.random.fold_in(base_key, step))
            step += 1
            steps_this_call += 1
            pending.append(metrics)
            now = clock()
            stop, time_due = agreement.exchange(
                (signals.requested, bool(save_interval) and now - last_save >= save_interval))
            if stop:
                # Save the step in flight and leave; an evaluation due now runs on resume.
                log_window()
                save(evaluated=False, eval_pending=step % eval_every == 0 or step == total_steps)
                stopped_by = signals.received or "a signal on another process"
                say(f"stopped by {stopped_by} after step {step}: checkpoint saved; rerun the "
                    "same command to resume")
                break
            if step % config.log_every_steps == 0 or step == total_steps:
                log_window()
            evaluated = step % eval_every == 0 or step == total_steps
            if evaluated:
                run_evaluation()
            if stop_after_steps is not None and steps_this_call >= stop_after_steps \
                    and step < total_steps:
                break
            if evaluated or time_due or step % checkpoint_every == 0 or step == total_steps:
                save(evaluated)
                last_save = now
    finally:
        progress.close()
        checkpointer.wait()
        writer.close()

    model_dir = None
    if step == total_steps and stopped_by is None:
        if config.export_model:
            model_dir = export_state(state, model_config, workdir / "model",
                                     {"stage": config.stage, "step": step, "name": config.name,
                                      "metrics": last_eval},
                                     workdir / "checkpoints", step)
            say(f"model written to {model_dir}")
        if primary:
            plot_learning_curves(workdir / "metrics.jsonl", workdir / "learning_curves.png",
                                 title=f"{config.name} ({config.stage})")
    checkpointer.close()
    return RunSummary(workdir, start_step, step, total_steps, last_eval, model_dir,
                      time.time() - started, stopped_by)


def export_state(state: TrainState, model_config: ModelConfig, out_dir: Path,
                 metadata: dict[str, Any], checkpoint_dir: Path, step: int) -> Path:
    """Write the final variables as a MODEL_DIR.

    One process: directly. Several: the model directory's orbax writer would wait for every
    process, so process 0 exports the (identical, just saved) final checkpoint from a fresh
    single process on the CPU while the others wait.
    """
    if jax.process_count() == 1:
        from rep_medsam_jax.model_dir import save_model_dir  # noqa: PLC0415

        variables = sharding_lib.to_host(state.variables())
        if not variables["batch_stats"]:
            variables.pop("batch_stats")
        return save_model_dir(out_dir, model_config, variables, metadata=metadata,
                              overwrite=True)
    if jax.process_index() == 0:
        import os  # noqa: PLC0415
        import subprocess  # noqa: PLC0415
        import sys  # noqa: PLC0415

        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
        env["JAX_PLATFORMS"] = "cpu"
        result = subprocess.run([sys.executable, "-m", "rep_medsam_jax.training.checkpoint",
                                 str(checkpoint_dir), str(out_dir), str(step)],
                                env=env, capture_output=True, text=True)
        if result.returncode != 0:
            _LOG.error("export failed: %s", result.stdout + result.stderr)
    _sync("model exported")
    return out_dir


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(config: TrainConfig, total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    if not config.progress_bar:
        quiet = _NoProgress()
        quiet.write = lambda text: _LOG.info(text)      # type: ignore[method-assign]
        return quiet
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, desc=config.name, unit="step", dynamic_ncols=True)
