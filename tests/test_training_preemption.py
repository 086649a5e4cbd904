"""Stopping and saving on time, in-process (so the clock can be faked): signals become a flag,
time-based checkpoints follow the clock, a signal at an evaluation step saves before evaluating
and the resumed run evaluates first, bit-identical to the uninterrupted run; and a run of more
than an epoch with two evaluations (each ending in a partial batch) compiles each step once.

Tiny model at 32 x 32, batch 4, 15 training examples (3 steps per epoch) and 5 validation
examples (one full batch and one padded batch), 4 steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from rep_medsam_jax.training.config import DataSection, ModelSection, TrainConfig
from rep_medsam_jax.training.optim import OptimConfig
from rep_medsam_jax.training.preemption import HostAgreement, StopSignals

pytestmark = pytest.mark.slow


def test_signals_become_a_flag_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        assert not signals.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested and signals.received == "SIGTERM"
        # A second Ctrl-C does not wait for the step.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_one_process_agreement_applies_at_once():
    agreement = HostAgreement(mesh=None, count=2)
    assert agreement.exchange((True, False)) == (True, False)
    assert agreement.exchange((False, True)) == (False, True)


class FakeClock:
    """Seconds from a list, one per call (the loop reads the clock once at start and once per
    step); optionally sends this process SIGTERM on call ``kill_at``."""

    def __init__(self, minutes: list[float], kill_at: int | None = None):
        self.seconds = [60.0 * m for m in minutes]
        self.calls = 0
        self.kill_at = kill_at

    def __call__(self) -> float:
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        value = self.seconds[min(self.calls, len(self.seconds) - 1)]
        self.calls += 1
        return value


# Start, then steps 1..4. Evaluations at 2 and 4; a save is due at step 3 (3 min after step 2's).
MINUTES = [0.0, 0.5, 1.0, 4.0, 4.5]


class CompileLog(logging.Handler):
    """Counts jax's "Compiling jit(NAME)" log lines (``jax_log_compiles``) per NAME."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling jit("):
            name = message[len("Compiling jit("):].split(")", 1)[0]
            self.counts[name] = self.counts.get(name, 0) + 1


@contextlib.contextmanager
def persistent_cache(directory: Path):
    """JAX's persistent compilation cache in ``directory`` for the duration (jax decides whether
    the cache is used at its first compilation, so the decision is reset on the way in and
    out)."""
    from jax._src import compilation_cache

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(directory))
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run (compilations counted) and a run stopped by SIGTERM at step 2 then
    resumed, sharing a persistent compilation cache."""
    from rep_medsam_jax.training.loop import train_and_evaluate
    from tests.phantom_data import build_2d_phantoms

    root = tmp_path_factory.mktemp("preemption")
    built = build_2d_phantoms(root, n2d=8)
    config = TrainConfig(
        name="preemption", stage="seg", model=ModelSection(preset="rep_medsam_tiny",
                                                            image_size=32),
        data=DataSection(dataset_dir=str(built.dataset_dir), augment="finetune", box_shift=2),
        optim=OptimConfig(learning_rate=3e-3, clip="percentile", clip_history=16),
        batch_size=4, total_steps=4, eval_every_steps=2, checkpoint_every_minutes=2.0,
        keep_checkpoints=10, log_every_steps=1, progress_bar=False, export_model=False)
    quiet = dict(log=lambda message: None)
    logger = logging.getLogger("jax._src.interpreters.pxla")
    compile_log = CompileLog()
    logger.addHandler(compile_log)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with persistent_cache(root / "xla_cache"):
            whole = train_and_evaluate(config, root / "whole", clock=FakeClock(MINUTES), **quiet)
            counts = dict(compile_log.counts)
            stopped = train_and_evaluate(config, root / "stopped",
                                         clock=FakeClock(MINUTES, kill_at=2), **quiet)
            steps_when_stopped = _steps(root / "stopped")
            resumed = train_and_evaluate(config, root / "stopped", clock=FakeClock(MINUTES),
                                         **quiet)
    finally:
        logger.removeHandler(compile_log)
        jax.config.update("jax_log_compiles", previous)
    return {"root": root, "config": config, "built": built, "counts": counts, "whole": whole,
            "stopped": stopped, "steps_when_stopped": steps_when_stopped, "resumed": resumed}


def _steps(workdir: Path) -> list[int]:
    from rep_medsam_jax.training.checkpoint import finished_steps

    return finished_steps(workdir / "checkpoints")


def _state(workdir: Path, step: int) -> dict:
    from rep_medsam_jax.training.checkpoint import load_state_tree

    tree = load_state_tree(workdir / "checkpoints", step)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _meta(workdir: Path, step: int) -> dict:
    from rep_medsam_jax.training.checkpoint import read_checkpoint_meta

    return read_checkpoint_meta(workdir / "checkpoints", step)


def test_time_based_checkpoint_follows_the_clock(runs):
    # Evaluations save steps 2 and 4; the clock makes step 3 due (3 minutes after step 2's save,
    # more than checkpoint_every_minutes = 2) but not step 1 (half a minute after the start).
    assert _steps(runs["root"] / "whole") == [2, 3, 4]
    assert _meta(runs["root"] / "whole", 3)["metrics"] == {}


def test_each_step_compiles_once_over_an_epoch_and_padded_evaluations(runs):
    from input_pipeline.loader import ExampleSource

    dataset = runs["built"].dataset_dir
    batch = runs["config"].batch_size
    assert len(ExampleSource(dataset, "train")) // batch < runs["config"].total_steps  # > 1 epoch
    assert len(ExampleSource(dataset, "validation")) % batch != 0      # a padded last batch
    assert runs["counts"].get("seg_step") == 1, runs["counts"]
    assert runs["counts"].get("eval_step") == 1, runs["counts"]


def test_sigterm_at_an_evaluation_step_saves_first_and_resumes_bit_identical(runs):
    root = runs["root"]
    stopped, resumed = runs["stopped"], runs["resumed"]
    assert stopped.stopped_by == "SIGTERM" and stopped.final_step == 2
    # Saved at once, before the evaluation due at step 2 (which the resumed run did first).
    assert runs["steps_when_stopped"] == [2]
    assert resumed.start_step == 2 and resumed.final_step == 4 and resumed.stopped_by is None
    assert _meta(root / "stopped", 2)["metrics"] == _meta(root / "whole", 2)["metrics"]
    whole, again = _state(root / "whole", 4), _state(root / "stopped", 4)
    assert whole.keys() == again.keys()
    for key in whole:
        np.testing.assert_array_equal(again[key], whole[key], err_msg=key)

    def rows(workdir):
        return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]

    def without_speed(row):
        return {k: v for k, v in row.items() if k != "train/images_per_second"}

    assert [without_speed(r) for r in rows(root / "stopped")] == [
        without_speed(r) for r in rows(root / "whole")]


def test_a_stopped_run_is_not_exported(runs, tmp_path):
    """A signal at the very last step: saved, not exported; the rerun evaluates and exports."""
    from rep_medsam_jax.training.loop import train_and_evaluate

    config = dataclasses.replace(runs["config"], total_steps=1, eval_every_steps=1,
                                 export_model=True)
    with persistent_cache(runs["root"] / "xla_cache"):
        first = train_and_evaluate(config, tmp_path, clock=FakeClock(MINUTES, kill_at=1),
                                   log=lambda message: None)
        assert first.stopped_by == "SIGTERM" and first.model_dir is None
        assert not (tmp_path / "model").exists() and _steps(tmp_path) == [1]
        second = train_and_evaluate(config, tmp_path, log=lambda message: None)
    assert second.final_step == 1 and second.last_eval["val/count"] == 5
    assert (tmp_path / "model" / "config.json").is_file()
    assert _meta(tmp_path, 1)["metrics"]["val/dsc"] == second.last_eval["val/dsc"]
