"""A model directory: the variables (orbax) and a JSON config naming the variant.

Layout::

    MODEL_DIR/
      config.json     {"format": "rep_medsam_jax.model_dir", "version": 1, "model": ModelConfig, ...}
      variables/      orbax checkpoint of {"params": ..., "batch_stats": ...} (NumPy leaves)

One loader (`load_model_dir`) serves training initialisation, export and JAX inference.
Writing is atomic: everything goes to a temporary sibling directory that is renamed into place at
the end, so a failure never leaves a half-written MODEL_DIR behind. A MODEL_DIR may also be a URL
(``gs://...``, see ``rep_medsam_jax.io.storage``): an object store cannot rename a directory, so
it is written in place with ``config.json`` last, and a folder without it is no MODEL_DIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rep_medsam_jax.io.storage import absolute, as_path, directory_in_place, is_url
from rep_medsam_jax.models.config import ModelConfig

FORMAT_NAME = "rep_medsam_jax.model_dir"
FORMAT_VERSION = 1


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or of an unknown format."""


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` only if the block succeeds.

    The temporary directory is a sibling of ``target`` (same file system, so the final rename is
    atomic). On any exception it is deleted and ``target`` is left untouched. For a URL see
    ``storage.directory_in_place`` (written in place; the caller writes its marker file last).
    """
    if is_url(target):
        with directory_in_place(target, overwrite=overwrite) as path:
            yield path
        return
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True / --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _to_numpy_tree(tree: Mapping) -> dict:
    return {k: _to_numpy_tree(v) if isinstance(v, Mapping) else np.asarray(v)
            for k, v in tree.items()}


def save_model_dir(out_dir: str | os.PathLike, config: ModelConfig, variables: Mapping,
                   metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``variables`` and ``config`` as a model directory, atomically."""
    import orbax.checkpoint as ocp  # noqa: PLC0415  (heavy; only the JAX paths need it)

    config.validate()
    tree = _to_numpy_tree(variables)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(absolute(tmp / "variables"), tree)
        checkpointer.wait_until_finished()
        document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": config.to_json(),
                    "metadata": dict(metadata or {})}
        # Written last: on a URL its presence is what makes the folder a MODEL_DIR.
        (tmp / "config.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return as_path(out_dir)


def read_model_config(model_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and free-form metadata of a model directory (no weights read)."""
    model_dir = as_path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"{model_dir}: not a model directory (no config.json)")
    try:
        document = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{config_path}: invalid JSON: {err}") from err
    if document.get("format") != FORMAT_NAME:
        raise ModelDirError(f"{config_path}: unknown format {document.get('format')!r}")
    if document.get("version") != FORMAT_VERSION:
        raise ModelDirError(f"{config_path}: unsupported version {document.get('version')!r}")
    return ModelConfig.from_json(document["model"]), document.get("metadata", {})


def load_model_dir(model_dir: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """Read a model directory: ``(config, variables)`` with NumPy leaves."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    config, _ = read_model_config(model_dir)
    variables_path = absolute(as_path(model_dir) / "variables")
    if not variables_path.is_dir():
        raise ModelDirError(f"{model_dir}: no variables/ checkpoint")
    variables = ocp.StandardCheckpointer().restore(variables_path)
    return config, variables
