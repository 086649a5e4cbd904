"""Training checkpoints with orbax: the whole TrainState, each process's data-iterator state and
a JSON record, saved together as one step; the last N kept plus the best by a validation metric.

Layout (``WORKDIR/checkpoints``)::

    <step>/state/     orbax PyTree: {"step", "params", "batch_stats", "opt_state", "rng"}
    <step>/data/      process_<i>-of-<n>.bin: that process's data-iterator state (raw bytes)
    <step>/meta/      JSON: model config, training config, metrics at this step

Atomicity: orbax writes a step into a temporary directory and renames it when every item (and
every process) is done; :meth:`Checkpointer.latest_step` only sees finished steps, and
temporary leftovers of a killed save are deleted at start-up. So a run killed at any moment
restarts from the last complete checkpoint. On ``gs://`` (no rename) orbax writes a step in place
and marks it finished with a ``commit_success.txt`` file, which :func:`finished_steps` requires.

Multi-host: every process calls :meth:`Checkpointer.save` with the same step (orbax writes the
replicated arrays once and synchronises the processes); each process writes its own
data-iterator file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rep_medsam_jax.io.storage import absolute, as_path
from rep_medsam_jax.training.steps import TrainState


class CheckpointError(ValueError):
    """A checkpoint cannot be used with this run (other model, other process count, ...)."""


# --------------------------------------------------------------------------------------------
# Per-process data-iterator state as an orbax item
# --------------------------------------------------------------------------------------------

class DataStateHandler(ocp.CheckpointHandler):
    """Writes this process's iterator state (bytes, or JSON-able data) to its own file."""

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        state = args.state
        payload = state if isinstance(state, bytes) else json.dumps(state).encode()
        kind = "bytes" if isinstance(state, bytes) else "json"
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}"
        (directory / f"{name}.{kind}").write_bytes(payload)

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
        directory = epath.Path(directory)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}"
        for kind in ("bytes", "json"):
            path = directory / f"{name}.{kind}"
            if path.exists():
                payload = path.read_bytes()
                return payload if kind == "bytes" else json.loads(payload.decode())
        written = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        raise CheckpointError(f"{directory}: no data-iterator state for {name} (found "
                              f"{written}); resume with the process count that wrote it")

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# --------------------------------------------------------------------------------------------
# The checkpointer
# --------------------------------------------------------------------------------------------

def state_tree(state: TrainState) -> dict:
    """TrainState -> the plain dict that orbax stores."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


def state_from_tree(tree: Mapping) -> TrainState:
    return TrainState(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                      opt_state=tree["opt_state"], rng=tree["rng"])


class Checkpointer:
    """Save / restore TrainState + data state + JSON meta under one directory.

    keep_last: the most recent checkpoints kept. best_metric / best_mode: additionally keep the
    one checkpoint with the best value of that metric (a key of the ``metrics`` passed to
    :meth:`save`; "max" or "min"); steps saved without metrics never count as best.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3,
                 best_metric: str | None = "val/dsc", best_mode: str = "max",
                 async_save: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = absolute(directory)
        self.best_metric = best_metric
        self.best_mode = best_mode
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep_last)]
        if best_metric:
            # BestN keeps the last n after sorting ascending (descending with reverse=True).
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric],
                reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": DataStateHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    # -- queries -------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (None if no step has metrics)."""
        if not self.best_metric:
            return None
        scored = []
        for step in self.all_steps():
            meta = self.read_meta(step)
            value = (meta.get("metrics") or {}).get(self.best_metric)
            if value is not None:
                scored.append((value, step))
        if not scored:
            return None
        return (max(scored) if self.best_mode == "max" else min(scored))[1]

    def read_meta(self, step: int) -> dict:
        """The JSON record of ``step`` (cheap: no arrays read)."""
        return read_checkpoint_meta(self.directory, step)

    # -- save / restore ------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, data_state: Any, meta: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None) -> bool:
        """Start saving ``step`` (asynchronously; :meth:`wait` blocks until it is complete)."""
        record = dict(meta)
        record["step"] = int(step)
        record["metrics"] = {k: float(v) for k, v in (metrics or {}).items()}
        best = None
        if metrics is not None and self.best_metric and self.best_metric in metrics:
            best = {self.best_metric: float(metrics[self.best_metric])}
        return self._manager.save(
            int(step), metrics=best, force=True,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state_tree(state)),
                                    data=DataStateSave(data_state),
                                    meta=ocp.args.JsonSave(record)))

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, Any, dict]:
        """(state, data_state, meta) of ``step``. ``abstract_state``: a TrainState of arrays or
        ShapeDtypeStructs with the wanted shardings (e.g. from ``jax.eval_shape``)."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_tree(abstract_state))
        restored = self._manager.restore(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                               data=DataStateRestore(),
                                               meta=ocp.args.JsonRestore()))
        return state_from_tree(restored["state"]), restored["data"], dict(restored["meta"])

    def delete(self, step: int) -> None:
        """Remove a finished step (every process calls it; orbax synchronises them)."""
        self._manager.delete(int(step))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def read_checkpoint_meta(directory: str | Path, step: int) -> dict:
    """The JSON record of a finished step, read directly from disk (no JAX, no orbax)."""
    path = as_path(directory) / str(step) / "meta" / "metadata"
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no checkpoint record")
    return json.loads(path.read_text())


def finished_steps(directory: str | Path) -> list[int]:
    """Steps with a finished checkpoint under ``directory`` (orbax's temporary directories of
    interrupted saves are not integers and are skipped)."""
    directory = as_path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and _is_finished(p))


def _is_finished(step_dir) -> bool:
    if not (step_dir.is_dir() and (step_dir / "meta").is_dir()):
        return False
    # On gs:// orbax renames nothing: a step is finished once its commit file exists.
    return not str(step_dir).startswith("gs://") or (step_dir / "commit_success.txt").exists()


# --------------------------------------------------------------------------------------------
# Export a checkpoint as a MODEL_DIR
# --------------------------------------------------------------------------------------------

def select_step(directory: str | Path, which: str = "latest") -> int:
    """"latest", "best" (by the run's own best_metric; the latest if none is scored) or a step
    number -> a finished step under ``directory``."""
    steps = finished_steps(directory)
    if not steps:
        raise CheckpointError(f"{directory}: no finished checkpoint")
    if which == "latest":
        return steps[-1]
    if which == "best":
        scored = []
        for step in steps:
            meta = read_checkpoint_meta(directory, step)
            run = meta.get("config", {})
            metric, mode = run.get("best_metric"), run.get("best_mode", "max")
            value = (meta.get("metrics") or {}).get(metric) if metric else None
            if value is not None:
                scored.append((value if mode == "max" else -value, step))
        return max(scored)[1] if scored else steps[-1]
    if int(which) not in steps:
        raise CheckpointError(f"{directory}: no finished checkpoint at step {which}; "
                              f"have {steps}")
    return int(which)


def load_state_tree(directory: str | Path, step: int) -> dict:
    """The stored state dict of a finished step ({"step", "params", "batch_stats",
    "opt_state", "rng"}, optimiser states as nested containers), as NumPy, read in this one
    process whatever device layout wrote it."""
    path = absolute(as_path(directory) / str(step) / "state")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    # The stored shardings name the writer's devices; read every array onto one of ours.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          tree)
    return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def load_checkpoint_variables(directory: str | Path, step: int) -> dict:
    """``{"params", "batch_stats"}`` of a finished step, as NumPy (any process count wrote
    it; read in this one process)."""
    tree = load_state_tree(directory, step)
    variables = {"params": jax.tree.map(np.asarray, tree["params"])}
    if tree.get("batch_stats"):
        variables["batch_stats"] = jax.tree.map(np.asarray, tree["batch_stats"])
    return variables


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, which: str = "latest",
                      overwrite: bool = True) -> Path:
    """Write a finished checkpoint as a MODEL_DIR (``rep-medsam export`` / ``predict`` take it).

    Runs in a single process; a multi-process run calls it through :func:`main` in a fresh
    process, since the model directory's orbax writer would otherwise wait for every process.
    """
    from rep_medsam_jax.model_dir import save_model_dir  # noqa: PLC0415
    from rep_medsam_jax.models.config import ModelConfig  # noqa: PLC0415

    step = select_step(checkpoint_dir, which)
    meta = read_checkpoint_meta(checkpoint_dir, step)
    model_config = ModelConfig.from_json(meta["model"])
    variables = load_checkpoint_variables(checkpoint_dir, step)
    metadata = {"stage": meta.get("stage"), "step": step,
                "name": (meta.get("config") or {}).get("name"),
                "metrics": meta.get("metrics", {}), "checkpoint": str(as_path(checkpoint_dir))}
    return save_model_dir(out_dir, model_config, variables, metadata=metadata,
                          overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """``python -m rep_medsam_jax.training.checkpoint WORKDIR/checkpoints OUT [latest|best|N]``"""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="Export a training checkpoint as a MODEL_DIR")
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out_dir")
    parser.add_argument("which", nargs="?", default="latest",
                        help="latest (default), best, or a step number")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint_dir, args.out_dir, args.which)
    except CheckpointError as err:
        print(f"error: {err}")
        return 1
    print(f"model written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
