"""Training configuration: frozen dataclasses, written as ``ml_collections`` config files and
checked before any compute (:func:`validate`).

A config file (``configs/*.py``) defines ``get_config()`` returning an
``ml_collections.ConfigDict`` (:func:`as_config_dict` of a :class:`TrainConfig`), so that
``train.py --config configs/x.py --config.optim.learning_rate=1e-4`` overrides any value, typed
by the ConfigDict, as flax's examples and big_vision do. :func:`from_config_dict` turns the
result back into the dataclasses, refusing unknown keys and converting each value to its field's
type. ``load_config`` also reads a ``.json`` file (``TrainConfig.to_json()``, e.g. a run's
``WORKDIR/config.json``) and applies ``key=value`` overrides in Python.

Nothing here computes or touches a device, so a bad config fails in about a second.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rep_medsam_jax.io.storage import StorageError, as_path, check_url, is_url
from rep_medsam_jax.losses import SegLossWeights
from rep_medsam_jax.training.optim import OptimConfig

STAGES = ("distill", "seg")
AUGMENTS = ("finetune", "pipeline", "distill", "none")
TEACHER_SOURCES = ("cache", "online")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model, and where its initial weights come from.

    preset: a key of ``models.config.MODEL_PRESETS``. image_size: override the preset's input
    size (the embedding grid follows, size / 4), for small CPU runs.
    init_from: a MODEL_DIR (e.g. converted MedSAM heads for distillation, or the previous
    stage's exported ``WORKDIR/model``) or a previous stage's WORKDIR (its best, else latest,
    checkpoint). init_parts: which parts to take from it; the others start random.
    """

    preset: str = "rep_medsam"
    image_size: int = 0
    init_from: str = ""
    init_parts: tuple[str, ...] = ("image_encoder", "prompt_encoder", "mask_decoder")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One source of a training mixture (``input_pipeline.mixture.Source``).

    dataset_dir: a built dataset. split: "" for ``data.train_split``. fraction > 0: each slice
    ``floor(fraction)`` times plus a seeded uniform subset of the rest (0.2: a fixed 20 %; 2:
    every slice twice). modalities / exclude_modalities: keep only / drop these case modalities
    (one of the two). teacher_cache_dir: this source's teacher embeddings (distillation from a
    cache needs one per source; other stages ignore it).
    """

    dataset_dir: str = ""
    split: str = ""
    fraction: float = 1.0
    modalities: tuple[str, ...] = ()
    exclude_modalities: tuple[str, ...] = ()
    teacher_cache_dir: str = ""


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Where examples come from and how they are augmented.

    dataset_dir: a built dataset (``python -m input_pipeline.build``), the tfds version folder
    ``DATA/med_sam_slices/size<S>/2.0.0``. Or, for laptops and tests, ``phantoms = (n2d, n3d)``:
    that many built-in phantom cases are written and built into ``WORKDIR/data`` at
    ``phantom_image_size``.
    sampling: "slice" (an epoch is one pass over the slices, one of each slice's objects drawn
    uniformly every time, as the authors' ``train_one_gpu.py`` does) or "object" (one pass over
    every object, so slices with many objects weigh more). Evaluation scores every object.
    augment: "finetune" (colour jitter + flips p=0.7 + box jitter, the authors'
    ``train_one_gpu.py``), "pipeline" (the same without colour jitter), "distill" (flips only)
    or "none".
    teacher_cache_dir / eval_teacher_cache_dir: teacher embeddings of the train / validation
    split (``python -m input_pipeline.teacher_cache``), for distillation with teacher "cache".
    sources: several datasets instead of ``dataset_dir`` (:class:`DataSource`, mixed by
    ``input_pipeline.mixture`` with subsets seeded by ``seed``); evaluation then reads
    ``eval_split`` of ``eval_dataset_dir``, else of the first source's dataset (all of it).
    eval_dataset_dir: evaluate on this dataset instead (with or without sources).
    """

    dataset_dir: str = ""
    sources: tuple[DataSource, ...] = ()
    eval_dataset_dir: str = ""
    phantoms: tuple[int, ...] = ()
    phantom_seed: int = 0
    phantom_image_size: int = 256
    phantom_modalities: tuple[str, ...] = ()
    validation_fraction: float = 0.1
    train_split: str = "train"
    eval_split: str = "validation"
    sampling: str = "slice"
    augment: str = "finetune"
    flip_probability: float = 0.7
    box_shift: int = 5
    teacher_cache_dir: str = ""
    eval_teacher_cache_dir: str = ""
    worker_count: int = 0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TeacherSection:
    """The distillation target: "cache" (embeddings stored per example) or "online" (a ViT
    teacher run in the step on the same augmented image). Online weights: ``model_dir`` (a
    converted MedSAM ViT-B) or, for tests and smoke runs, random weights of ``variant``."""

    source: str = "cache"
    model_dir: str = ""
    variant: str = "medsam_vit_b"
    random_seed: int = -1


@dataclasses.dataclass(frozen=True)
class LossSection:
    """Segmentation loss weights (``losses.SegLossWeights``) and the distillation weight."""

    dice: float = 1.0
    bce: float = 1.0
    iou: float = 1.0
    squared: bool = True
    distill_weight: float = 1.0

    def seg_weights(self) -> SegLossWeights:
        return SegLossWeights(self.dice, self.bce, self.iou, self.squared)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (one stage).

    stage: "distill" (encoder embedding MSE) or "seg" (the whole pipeline).
    batch_size: the global batch over all devices and processes.
    num_epochs: passes over the train split (fractions allowed); total_steps > 0 overrides.
    eval_every_steps / checkpoint_every_steps: 0 means once per epoch / at every evaluation.
    checkpoint_every_minutes: also save when this much time passed since the last save (0: off),
    which bounds the work a hard kill loses when epochs take hours.
    plateau_metric: the validation metric fed to reduce-on-plateau ("val/loss").
    best_metric / best_mode: which checkpoint is kept as the best.
    """

    name: str = "run"
    stage: str = "seg"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    loss: LossSection = LossSection()
    optim: OptimConfig = OptimConfig()
    batch_size: int = 16
    num_epochs: float = 1.0
    total_steps: int = 0
    compute_dtype: str = "float32"
    eval_every_steps: int = 0
    eval_max_batches: int = 0
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 0.0
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    best_metric: str = "val/dsc"
    best_mode: str = "max"
    plateau_metric: str = "val/loss"
    log_every_steps: int = 20
    progress_bar: bool = True
    export_model: bool = True
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data, "")


# --------------------------------------------------------------------------------------------
# Loading and overriding
# --------------------------------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` converted to the field type ``annotation`` (raises ConfigError)."""
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(annotation, value, key + ".")
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, *_rest) = typing.get_args(annotation) or (Any,)
        return tuple(_coerce(v, item_type, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if number != int(number):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        return str(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + u for u in unknown)}; "
                          f"known under '{prefix or '<top>'}': {sorted(types_)}")
    return cls(**{k: _coerce(v, types_[k], prefix + k) for k, v in data.items()})


def as_config_dict(config: TrainConfig):
    """A TrainConfig as an ``ml_collections.ConfigDict`` (what a config file's get_config()
    returns; its keys and value types are those of the dataclasses)."""
    import ml_collections  # noqa: PLC0415

    return ml_collections.ConfigDict(config.to_json())


def from_config_dict(config_dict: Any) -> TrainConfig:
    """A ConfigDict (or a plain mapping) of :func:`as_config_dict`'s layout -> TrainConfig;
    raises ConfigError on unknown keys or values of the wrong type."""
    data = config_dict.to_dict() if hasattr(config_dict, "to_dict") else dict(config_dict)
    return TrainConfig.from_json(data)


def _parse_literal(text: str) -> Any:
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            continue
    return text


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """``["optim.learning_rate=1e-4", ...]`` applied in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        config = _replace_path(config, key.strip().split("."), _parse_literal(text.strip()), key)
    return config


def _replace_path(node: Any, path: list[str], value: Any, key: str) -> Any:
    types_ = _field_types(type(node))
    name = path[0]
    if name not in types_:
        raise ConfigError(f"override {key}: no key {name!r} here; known: {sorted(types_)}")
    if len(path) == 1:
        return dataclasses.replace(node, **{name: _coerce(value, types_[name], key)})
    child = getattr(node, name)
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"override {key}: {name!r} is not a section")
    return dataclasses.replace(node, **{name: _replace_path(child, path[1:], value, key)})


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """A config file (``configs/x.py`` with ``get_config()`` returning a ConfigDict or a
    TrainConfig, ``configs/x`` for the same, or a ``.json``) with ``overrides`` applied."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and path.with_suffix(".py").exists():
        path = path.with_suffix(".py")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix == ".json":
        config = TrainConfig.from_json(json.loads(path.read_text()))
    else:
        spec = importlib.util.spec_from_file_location(f"_train_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path}: a config file must define get_config()")
        config = module.get_config()
        if not isinstance(config, TrainConfig):
            if not hasattr(config, "to_dict"):
                raise ConfigError(f"{path}: get_config() must return an ml_collections "
                                  "ConfigDict (as_config_dict(TrainConfig(...)))")
            config = from_config_dict(config)
    return apply_overrides(config, overrides)


# --------------------------------------------------------------------------------------------
# Validation (no compute, no JAX)
# --------------------------------------------------------------------------------------------

def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: TrainConfig, workdir: str | Path | None = None,
             device_count: int | None = None, process_count: int = 1) -> None:
    """Check every value and every path the run will need; raise ConfigError on the first
    problem. With ``device_count`` the batch must split evenly over the devices; with
    ``workdir`` existing checkpoints there must be of the same model."""
    from rep_medsam_jax.models.config import MODEL_PRESETS  # noqa: PLC0415

    _check_urls(config, workdir)
    _need(config.stage in STAGES, f"stage must be one of {STAGES}, got {config.stage!r}")
    _need(config.model.preset in MODEL_PRESETS,
          f"model.preset {config.model.preset!r} is unknown; known: {sorted(MODEL_PRESETS)}")
    _need(config.model.image_size >= 0 and config.model.image_size % 4 == 0,
          f"model.image_size must be a multiple of 4 (0 = the preset's), got "
          f"{config.model.image_size}")
    try:
        config.optim.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _need(config.batch_size > 0, f"batch_size must be > 0, got {config.batch_size}")
    if device_count is not None:
        _need(config.batch_size % device_count == 0,
              f"batch_size {config.batch_size} is not divisible by the number of devices "
              f"({device_count}); use a multiple of {device_count}")
    _need(config.batch_size % process_count == 0,
          f"batch_size {config.batch_size} is not divisible by the number of processes "
          f"({process_count})")
    _need(config.total_steps > 0 or config.num_epochs > 0,
          f"num_epochs must be > 0 (or total_steps > 0), got {config.num_epochs}")
    _need(config.total_steps >= 0, f"total_steps must be >= 0, got {config.total_steps}")
    _need(config.compute_dtype in ("float32", "bfloat16"),
          f"compute_dtype must be 'float32' or 'bfloat16', got {config.compute_dtype!r}")
    for key in ("eval_every_steps", "checkpoint_every_steps", "eval_max_batches"):
        _need(getattr(config, key) >= 0, f"{key} must be >= 0, got {getattr(config, key)}")
    _need(config.checkpoint_every_minutes >= 0,
          f"checkpoint_every_minutes must be >= 0 (0: off), got {config.checkpoint_every_minutes}")
    _need(config.keep_checkpoints >= 1,
          f"keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
    _need(config.log_every_steps >= 1,
          f"log_every_steps must be >= 1, got {config.log_every_steps}")
    _need(config.best_mode in ("max", "min"),
          f"best_mode must be 'max' or 'min', got {config.best_mode!r}")
    _need(config.plateau_metric.startswith("val/"),
          f"plateau_metric must be a validation metric ('val/...'), got "
          f"{config.plateau_metric!r}")
    loss = config.loss
    _need(min(loss.dice, loss.bce, loss.iou, loss.distill_weight) >= 0,
          "loss weights must be >= 0")
    bad_parts = set(config.model.init_parts) - {"image_encoder", "prompt_encoder",
                                                "mask_decoder"}
    _need(not bad_parts, f"model.init_parts names unknown parts {sorted(bad_parts)}")

    data = config.data
    _need(data.sampling in ("slice", "object"),
          f"data.sampling must be 'slice' or 'object', got {data.sampling!r}")
    _need(data.augment in AUGMENTS,
          f"data.augment must be one of {AUGMENTS}, got {data.augment!r}")
    _need(0 <= data.flip_probability <= 1,
          f"data.flip_probability must be in [0, 1], got {data.flip_probability}")
    _need(data.box_shift >= 0, f"data.box_shift must be >= 0, got {data.box_shift}")
    _need(data.worker_count >= 0, f"data.worker_count must be >= 0, got {data.worker_count}")
    if data.phantoms:
        _need(len(data.phantoms) == 2 and min(data.phantoms) >= 0 and sum(data.phantoms) >= 2,
              f"data.phantoms must be (n2d, n3d) with at least two cases, got {data.phantoms}")
        _need(0 < data.validation_fraction < 1,
              f"data.validation_fraction must be in (0, 1), got {data.validation_fraction}")
    elif data.sources:
        _need(not data.dataset_dir,
              f"give data.sources or data.dataset_dir ({data.dataset_dir}), not both")
        for number, source in enumerate(data.sources):
            _check_dataset_dir(source.dataset_dir, f"data.sources[{number}].dataset_dir")
        _check_mixture(config)
    else:
        _need(bool(data.dataset_dir),
              "data.dataset_dir is empty: give a built dataset (python -m input_pipeline.build "
              "... then --config.data.dataset_dir=DATA/med_sam_slices/size256/2.0.0), "
              "data.sources=({'dataset_dir': ...}, ...) for several, or "
              "data.phantoms=(n2d,n3d) for built-in data")
        _check_dataset_dir(data.dataset_dir, "data.dataset_dir")
    _need(not (data.phantoms and data.sources),
          "give data.sources or data.phantoms, not both")
    if data.eval_dataset_dir:
        _check_dataset_dir(data.eval_dataset_dir, "data.eval_dataset_dir")

    if config.stage == "distill":
        teacher = config.teacher
        _need(teacher.source in TEACHER_SOURCES,
              f"teacher.source must be one of {TEACHER_SOURCES}, got {teacher.source!r}")
        if teacher.source == "cache" and data.sources:
            _need(not data.teacher_cache_dir,
                  "with data.sources give each source its teacher_cache_dir, not "
                  "data.teacher_cache_dir")
            for number, source in enumerate(data.sources):
                key = f"data.sources[{number}].teacher_cache_dir"
                _need(bool(source.teacher_cache_dir),
                      f"distillation from a cache needs {key} (python -m "
                      "input_pipeline.teacher_cache ...), or teacher.source=online")
                _need(Path(source.teacher_cache_dir).is_dir(),
                      f"{key} {source.teacher_cache_dir} does not exist")
        elif teacher.source == "cache":
            _need(bool(data.teacher_cache_dir),
                  "distillation from a cache needs data.teacher_cache_dir (python -m "
                  "input_pipeline.teacher_cache ...), or teacher.source=online")
            _need(as_path(data.teacher_cache_dir).is_dir(),
                  f"data.teacher_cache_dir {data.teacher_cache_dir} does not exist")
        if teacher.source == "cache":
            _need(data.augment in ("distill", "none"),
                  "distilling from cached embeddings allows only data.augment=distill (flips, "
                  "mirrored onto the stored embedding) or none: colour jitter would change the "
                  "student's image but not the stored target")
        else:
            _need(bool(teacher.model_dir) or teacher.random_seed >= 0,
                  "teacher.source=online needs teacher.model_dir (a converted MedSAM ViT-B) or "
                  "teacher.random_seed >= 0 (random weights, for tests)")
            if teacher.model_dir:
                _need(as_path(teacher.model_dir).is_dir(),
                      f"teacher.model_dir {teacher.model_dir} does not exist")
        if data.eval_teacher_cache_dir:
            _need(as_path(data.eval_teacher_cache_dir).is_dir(),
                  f"data.eval_teacher_cache_dir {data.eval_teacher_cache_dir} does not exist")
        _need("image_encoder" in config.optim.trainable,
              "distillation trains the image encoder: put it in optim.trainable")

    model_config = resolve_model_config(config)
    if config.model.init_from:
        _check_init_from(config, model_config)
    if workdir is not None:
        _check_existing_checkpoints(config, model_config, as_path(workdir))


def _check_dataset_dir(path: str, key: str) -> None:
    _need(bool(path), f"{key} is empty: give a built dataset "
          "(DATA/med_sam_slices/size<S>/<version>)")
    dataset = as_path(path)
    _need(dataset.is_dir(), f"{key} {dataset} does not exist")
    _need((dataset / "dataset_info.json").is_file(),
          f"{key} {dataset} is not a built dataset (no dataset_info.json); "
          "point it at DATA/med_sam_slices/size<S>/<version>")


def data_mixture(config: TrainConfig, teacher_caches: bool = False):
    """``data.sources`` as an ``input_pipeline.mixture.Mixture`` seeded by ``data.seed``
    (a source's empty split is ``data.train_split``); ``teacher_caches``: keep each source's
    teacher cache (distillation from a cache), else drop them."""
    from input_pipeline.mixture import Mixture, Source  # noqa: PLC0415

    data = config.data
    return Mixture(tuple(
        Source(s.dataset_dir, s.split or data.train_split, s.fraction, s.modalities,
               s.exclude_modalities, (s.teacher_cache_dir or None) if teacher_caches else None)
        for s in data.sources), seed=data.seed)


def _check_mixture(config: TrainConfig) -> None:
    """Build the mixture's table from the record indexes (no image read): bad fractions,
    unknown modality names and sources that select nothing fail here, before any compute."""
    from input_pipeline.mixture import MixtureError, mixture_table  # noqa: PLC0415

    try:
        mixture_table(data_mixture(config), config.data.sampling)
    except MixtureError as err:
        raise ConfigError(f"data.sources: {err}") from None


def _check_urls(config: TrainConfig, workdir: str | Path | None) -> None:
    """Any path may be a URL (``gs://...``, rep_medsam_jax.io.storage): its scheme must be known
    and its file-system package (gcsfs for gs://) installed, checked here before any compute."""
    paths = {"--workdir": workdir, "data.dataset_dir": config.data.dataset_dir,
             "data.teacher_cache_dir": config.data.teacher_cache_dir,
             "data.eval_teacher_cache_dir": config.data.eval_teacher_cache_dir,
             "data.eval_dataset_dir": config.data.eval_dataset_dir,
             "model.init_from": config.model.init_from,
             "teacher.model_dir": config.teacher.model_dir}
    for name, value in paths.items():
        if value and is_url(value):
            try:
                check_url(value)
            except StorageError as err:
                raise ConfigError(f"{name}: {err}") from None
    for number, source in enumerate(config.data.sources):
        for name in ("dataset_dir", "teacher_cache_dir"):
            value = getattr(source, name)
            if value and is_url(value):
                try:
                    check_url(value)
                except StorageError as err:
                    raise ConfigError(f"data.sources[{number}].{name}: {err}") from None


def resolve_model_config(config: TrainConfig):
    """The ModelConfig this run trains (the preset with ``model.image_size`` applied)."""
    from rep_medsam_jax.models.config import MODEL_PRESETS  # noqa: PLC0415

    model = MODEL_PRESETS[config.model.preset]
    if config.model.image_size:
        model = dataclasses.replace(model, image_size=config.model.image_size,
                                    embedding_size=config.model.image_size // 4)
    return model


def _describe(model_config) -> str:
    return (f"{model_config.encoder}:{model_config.encoder_variant} at "
            f"{model_config.image_size}px (decoder width {model_config.decoder.embed_dim})")


def _compatible(wanted, found, parts: Sequence[str]) -> bool:
    """Do the parts we take from ``found`` have the shapes ``wanted`` needs?"""
    if "image_encoder" in parts:
        if found.encoder == "none":
            return False
        if (found.encoder, found.encoder_variant) != (wanted.encoder, wanted.encoder_variant):
            return False
    if {"prompt_encoder", "mask_decoder"} & set(parts):
        if found.decoder != wanted.decoder or found.embedding_size != wanted.embedding_size:
            return False
    return True


def _check_init_from(config: TrainConfig, model_config) -> None:
    from rep_medsam_jax.model_dir import ModelDirError, read_model_config  # noqa: PLC0415

    source = as_path(config.model.init_from)
    _need(source.exists(), f"model.init_from {source} does not exist")
    found = init_source_model_config(source)
    if found is None:
        raise ConfigError(f"model.init_from {source} is neither a MODEL_DIR (config.json) nor "
                          "a training WORKDIR with checkpoints")
    if not _compatible(model_config, found, config.model.init_parts):
        raise ConfigError(f"model.init_from {source} holds a {_describe(found)} model; this run "
                          f"trains {_describe(model_config)}: parts {config.model.init_parts} "
                          "do not fit (another variant?)")
    del ModelDirError, read_model_config


def init_source_kind(source: Path) -> str | None:
    """``"workdir"`` (a training WORKDIR with finished checkpoints), ``"model_dir"`` or None.

    A WORKDIR also holds a ``config.json`` (the training config), so the checkpoints decide.
    """
    from rep_medsam_jax.training.checkpoint import finished_steps  # noqa: PLC0415

    if finished_steps(source / "checkpoints"):
        return "workdir"
    if (source / "config.json").is_file():
        return "model_dir"
    return None


def init_source_model_config(source: Path):
    """The ModelConfig of a MODEL_DIR or of a WORKDIR's newest checkpoint (None if neither)."""
    from rep_medsam_jax.model_dir import read_model_config  # noqa: PLC0415
    from rep_medsam_jax.models.config import ModelConfig  # noqa: PLC0415
    from rep_medsam_jax.training.checkpoint import finished_steps, read_checkpoint_meta  # noqa

    kind = init_source_kind(source)
    if kind == "model_dir":
        return read_model_config(source)[0]
    if kind == "workdir":
        checkpoints = source / "checkpoints"
        return ModelConfig.from_json(
            read_checkpoint_meta(checkpoints, finished_steps(checkpoints)[-1])["model"])
    return None


def _check_existing_checkpoints(config: TrainConfig, model_config, workdir: Path) -> None:
    from rep_medsam_jax.training.checkpoint import finished_steps, read_checkpoint_meta  # noqa

    checkpoints = workdir / "checkpoints"
    steps = finished_steps(checkpoints)
    if not steps:
        return
    meta = read_checkpoint_meta(checkpoints, steps[-1])
    if meta.get("model") != model_config.to_json():
        from rep_medsam_jax.models.config import ModelConfig  # noqa: PLC0415

        found = ModelConfig.from_json(meta["model"])
        raise ConfigError(f"{checkpoints} holds checkpoints of a {_describe(found)} model; this "
                          f"config trains {_describe(model_config)}: use another --workdir (or "
                          "the config that wrote them)")
    if meta.get("stage") not in (None, config.stage):
        raise ConfigError(f"{checkpoints} holds a {meta.get('stage')!r} run; this config is "
                          f"stage {config.stage!r}: use another --workdir")
