"""The training loop end to end, through ``train.py`` in subprocesses (each with its own device
count): restart equality after a stop, after SIGKILL and after SIGTERM (which saves the step in
flight and exits 0), 1 device vs 4 devices, two processes (jax.distributed on CPU with gloo
collectives) computing what one process computes and resuming after SIGTERM, and a WORKDIR
as the next stage's start.
The DSC that configs/local.py reaches is checked through the demo (tests/test_demo.py).

The runs share train.py's persistent compilation cache (in a temporary user cache folder), so
identical programs compile once per test session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rep_medsam_jax.training.config import DataSection, ModelSection, TrainConfig
from rep_medsam_jax.training.optim import OptimConfig

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6
# ``make test`` runs with ``--dist loadfile`` so that one xdist worker runs this whole module:
# the module fixtures below train several runs, which with plain ``load`` every worker running
# one of its tests would train again. (``--dist loadgroup`` with an xdist_group mark does not group under pytest 9.2:
# pytest-xdist issue #1386.)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A built 32 x 32 phantom dataset, a config JSON for it, and a compilation cache."""
    from tests.phantom_data import build_2d_phantoms

    root = tmp_path_factory.mktemp("training_loop")
    built = build_2d_phantoms(root, n2d=12)
    config = TrainConfig(
        name="test", stage="seg",
        model=ModelSection(preset="rep_medsam_tiny", image_size=32,
                           init_from=str(_well_conditioned_start(root / "start"))),
        # Colour jitter, flips and box jitter: the data iterator's random stream must resume too.
        data=DataSection(dataset_dir=str(built.dataset_dir), augment="finetune", box_shift=2),
        # eps 1e-3: parameters whose gradient is exactly zero in exact arithmetic (a key bias
        # under softmax, a bias followed by BatchNorm) get rounding-noise gradients ~1e-9, which
        # Adam with eps 1e-8 would turn into lr-sized steps of random sign; a larger eps keeps
        # the 1-vs-4-device comparison about the sharding, not about amplified rounding noise.
        optim=OptimConfig(learning_rate=3e-3, eps=1e-3, clip="percentile", clip_history=64),
        batch_size=8, total_steps=TOTAL_STEPS, eval_every_steps=3, checkpoint_every_steps=2,
        keep_checkpoints=10, log_every_steps=1, progress_bar=False)
    config_path = root / "config.py"          # an ml_collections config file, as configs/*.py
    config_path.write_text(
        "import json\n\nfrom rep_medsam_jax.training.config import TrainConfig, "
        "as_config_dict\n\n\ndef get_config():\n    return as_config_dict(TrainConfig.from_json("
        f"json.loads({json.dumps(config.to_json())!r})))\n")
    return {"root": root, "config": config_path}


def _well_conditioned_start(path: Path) -> Path:
    """A MODEL_DIR of the tiny model whose BatchNorm scales are U(0.5, 2) instead of RepViT's
    init, where the last BatchNorm of each channel mixer has scale 0: that zeroes the
    non-residual transition block, so the neck's LayerNorm normalises an almost constant input
    and gradients start near 1e6 and are dominated by rounding noise (a from-scratch start is
    chaotic: any change of summation order, such as another device count, changes the run)."""
    import dataclasses

    import jax

    from rep_medsam_jax.model_dir import save_model_dir
    from rep_medsam_jax.models.config import MODEL_PRESETS
    from rep_medsam_jax.models.medsam_lite import init_variables

    config = dataclasses.replace(MODEL_PRESETS["rep_medsam_tiny"], image_size=32,
                                 embedding_size=8)
    variables = init_variables(config, 0)
    rng = np.random.default_rng(0)

    def draw(keys, leaf):
        names = [k.key for k in keys]
        if names[-2:-1] == ["bn"] and names[-1] == "scale":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        return leaf

    variables["params"] = jax.tree_util.tree_map_with_path(draw, variables["params"])
    return save_model_dir(path, config, variables)


def _env(setup, devices: int = 1, **extra: str) -> dict:
    """The runs' environment: N CPU devices, and a user cache folder of their own, where
    train.py keeps its persistent compilation cache by default (so programs compile once per
    test session; even the tiny ones are kept)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "XDG_CACHE_HOME": str(setup["root"] / "user_cache"),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


def _command(setup, workdir: Path, *extra: str, config: Path | None = None) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(config or setup["config"]),
            "--workdir", str(workdir), *extra]


def _start(setup, workdir: Path, *extra: str, devices: int = 1, **env: str) -> subprocess.Popen:
    return subprocess.Popen(_command(setup, workdir, *extra), env=_env(setup, devices, **env),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(process: subprocess.Popen, timeout: int = 1500) -> str:
    try:
        output = process.communicate(timeout=timeout)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    return output


def _state(workdir: Path, step: int) -> dict:
    """A finished checkpoint's state tree as NumPy (flattened: path -> array)."""
    import jax

    from rep_medsam_jax.training.checkpoint import load_state_tree

    tree = load_state_tree(workdir / "checkpoints", step)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _data_state(workdir: Path, step: int, name: str = "process_0-of-1") -> bytes:
    return (workdir / "checkpoints" / str(step) / "data" / f"{name}.bytes").read_bytes()


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def runs(setup):
    """All single-process runs, two at a time (XLA compiles on one core):

    1. the uninterrupted 1-device baseline and the same run on 4 devices;
    2. then (compiled programs now cached) a run stopped after step 5 (``--stop_after_steps``)
       and a run killed with SIGKILL as soon as its step-3 checkpoint exists (possibly in the
       middle of training step 4 or of saving it);
    3. both restarted with the same command, beside a run sent SIGTERM as soon as it reports
       its start (so in its first steps, mid-epoch), which is then restarted.
    """
    root = setup["root"]
    workdirs = {name: root / name
                for name in ("baseline", "four_devices", "stopped", "killed", "terminated")}
    first = [_start(setup, workdirs["baseline"]),
             _start(setup, workdirs["four_devices"], devices=4)]
    baseline_output, four_output = [_finish(process) for process in first]

    stopped = _start(setup, workdirs["stopped"], "--stop_after_steps=5")
    killed = _start(setup, workdirs["killed"])
    deadline = time.time() + 900
    try:
        while not (workdirs["killed"] / "checkpoints" / "3").is_dir():
            assert killed.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            killed.kill()
    outputs = {"killed_rc": killed.returncode, "stopped_first": _finish(stopped),
               "baseline": baseline_output, "four_devices": four_output}
    outputs["stopped_steps"] = _steps(workdirs["stopped"])
    outputs["stopped_state_4"] = _state(workdirs["stopped"], 4)
    outputs["stopped_data_4"] = _data_state(workdirs["stopped"], 4)
    restarts = [_start(setup, workdirs["stopped"]), _start(setup, workdirs["killed"])]
    terminated = _start(setup, workdirs["terminated"])
    head = _read_until(terminated, "from step 0")
    terminated.send_signal(signal.SIGTERM)
    outputs["terminated_first"] = head + _finish(terminated)
    outputs["terminated_steps"] = _steps(workdirs["terminated"])
    outputs["terminated_rows"] = _rows(workdirs["terminated"])
    outputs["stopped_restart"], outputs["killed_restart"] = [_finish(p) for p in restarts]
    outputs["terminated_restart"] = _finish(_start(setup, workdirs["terminated"]))
    return workdirs, outputs


def _read_until(process: subprocess.Popen, text: str) -> str:
    """The output of ``process`` up to and including the first line containing ``text``."""
    lines = []
    while not lines or text not in lines[-1]:
        line = process.stdout.readline()
        assert line, "the run ended before: " + "".join(lines)[-3000:]
        lines.append(line)
    return "".join(lines)


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_compiled_programs_are_kept_in_the_user_cache_folder(setup, runs):
    """train.py's persistent compilation cache is on by default, in the user's cache folder."""
    folder = setup["root"] / "user_cache" / "rep_medsam_jax" / "jax_compilation"
    names = [p.name for p in folder.iterdir()]
    assert any(name.startswith("jit_seg_step") for name in names), names
    assert any(name.startswith("jit_eval_step") for name in names), names


def test_uninterrupted_run_writes_everything(runs):
    baseline = runs[0]["baseline"]
    assert _steps(baseline) == [2, 3, 4, 6]          # every 2 steps and at each evaluation
    assert (baseline / "model" / "config.json").is_file()
    assert (baseline / "learning_curves.png").stat().st_size > 1000
    assert list((baseline / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (baseline / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, TOTAL_STEPS + 1))
    assert [r["step"] for r in rows if "val/dsc" in r] == [3, 6]
    # The exported MODEL_DIR holds the final parameters.
    from rep_medsam_jax.model_dir import load_model_dir

    _, variables = load_model_dir(baseline / "model")
    final = _state(baseline, TOTAL_STEPS)
    np.testing.assert_array_equal(
        variables["params"]["mask_decoder"]["iou_token"],
        final["['params']['mask_decoder']['iou_token']"])


def test_a_workdir_initialises_the_next_stage(setup, runs, tmp_path):
    """``model.init_from`` may name a previous stage's WORKDIR (which holds a training
    config.json too): it is recognised as such and its best checkpoint is loaded."""
    import dataclasses

    import jax

    from rep_medsam_jax.model_dir import read_model_config
    from rep_medsam_jax.training.checkpoint import select_step
    from rep_medsam_jax.training.config import (init_source_kind, init_source_model_config,
                                                load_config, validate)
    from rep_medsam_jax.training.loop import load_init_variables

    baseline = runs[0]["baseline"]
    assert (baseline / "config.json").is_file()
    assert init_source_kind(baseline) == "workdir"
    assert init_source_kind(baseline / "model") == "model_dir"
    assert init_source_kind(tmp_path) is None                    # neither
    assert init_source_model_config(baseline) == read_model_config(baseline / "model")[0]
    config = load_config(setup["config"])
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, init_from=str(baseline)))
    validate(config)
    best = select_step(baseline / "checkpoints", "best")
    expected = _state(baseline, best)
    loaded = load_init_variables(baseline)
    for keys, leaf in jax.tree_util.tree_flatten_with_path(loaded["params"])[0]:
        np.testing.assert_array_equal(leaf, expected["['params']" + jax.tree_util.keystr(keys)])


def test_resume_after_stop_is_bit_identical(runs):
    workdirs, outputs = runs
    baseline, workdir = workdirs["baseline"], workdirs["stopped"]
    assert outputs["stopped_steps"] == [2, 3, 4]          # step 5 trained, never saved
    # The checkpoint resumed from equals the uninterrupted run's at the same step, data
    # iterator included (so the next batch is the same).
    assert outputs["stopped_data_4"] == _data_state(baseline, 4)
    _assert_same_state(outputs["stopped_state_4"], _state(baseline, 4))
    assert "resumed from" in outputs["stopped_restart"]
    _assert_same_state(_state(workdir, TOTAL_STEPS), _state(baseline, TOTAL_STEPS))
    assert _data_state(workdir, TOTAL_STEPS) == _data_state(baseline, TOTAL_STEPS)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, TOTAL_STEPS + 1))


def test_resume_after_sigkill_is_bit_identical(runs):
    workdirs, outputs = runs
    assert outputs["killed_rc"] == -signal.SIGKILL
    assert "resumed from" in outputs["killed_restart"]
    _assert_same_state(_state(workdirs["killed"], TOTAL_STEPS),
                       _state(workdirs["baseline"], TOTAL_STEPS))
    assert _data_state(workdirs["killed"], TOTAL_STEPS) == _data_state(workdirs["baseline"],
                                                                        TOTAL_STEPS)
    assert not [p for p in (workdirs["killed"] / "checkpoints").iterdir() if "tmp" in p.name]


def test_sigterm_saves_the_step_in_flight_exits_0_and_resumes_bit_identical(runs):
    workdirs, outputs = runs
    # _finish asserted exit status 0. The step saved is the last step trained (each is logged),
    # before the end.
    trained = [r["step"] for r in outputs["terminated_rows"] if "train/loss" in r]
    assert trained == list(range(1, trained[-1] + 1))
    assert outputs["terminated_steps"][-1] == trained[-1] < TOTAL_STEPS
    assert f"stopped by SIGTERM at step {trained[-1]}/{TOTAL_STEPS}" in outputs[
        "terminated_first"]
    assert "resumed from" in outputs["terminated_restart"]
    _assert_same_state(_state(workdirs["terminated"], TOTAL_STEPS),
                       _state(workdirs["baseline"], TOTAL_STEPS))
    assert _data_state(workdirs["terminated"], TOTAL_STEPS) == _data_state(workdirs["baseline"],
                                                                            TOTAL_STEPS)


def _assert_same_computation(baseline: Path, workdir: Path) -> str:
    """Parameters, BatchNorm statistics and per-step losses of two runs of the same batches on
    other device layouts agree to rounding; returns a one-line summary."""
    one, other = _state(baseline, TOTAL_STEPS), _state(workdir, TOTAL_STEPS)
    worst = {}
    for key in one:
        if "['params']" in key or "['batch_stats']" in key:
            worst[key] = float(np.max(np.abs(one[key] - other[key]))) if one[key].size else 0.0
    params = {k: v for k, v in worst.items() if k.startswith("['params']")}
    largest = max(params, key=params.get)
    early = _state(baseline, 2)
    moved = max(float(np.max(np.abs(one[k] - early[k]))) for k in params)
    summary = (f"after {TOTAL_STEPS} steps: parameters max |diff| {params[largest]:.3g} at "
               f"{largest} (they moved up to {moved:.3g} since step 2); BatchNorm statistics "
               f"max |diff| {max(v for k, v in worst.items() if 'batch_stats' in k):.3g}")
    # Only the summation order differs between the layouts (BatchNorm statistics, the loss and
    # the gradients are global means over the batch in both).
    assert params[largest] < 2e-5, (largest, params[largest])
    for key in worst:
        if "['batch_stats']" in key:          # running variances reach ~10: relative
            np.testing.assert_allclose(other[key], one[key], rtol=1e-5, atol=1e-5, err_msg=key)

    def losses(workdir):
        return np.array([[r["train/loss"], r["train/grad_norm"]] for r in _rows(workdir)
                         if "train/loss" in r])

    np.testing.assert_allclose(losses(workdir), losses(baseline), rtol=1e-4)
    return summary


def test_four_devices_match_one_device(runs):
    baseline, workdir = runs[0]["baseline"], runs[0]["four_devices"]
    assert "over 4 device(s)" in runs[1]["four_devices"]
    assert "over 1 device(s)" in runs[1]["baseline"]
    assert _data_state(workdir, TOTAL_STEPS) == _data_state(baseline, TOTAL_STEPS)
    print("1 vs 4 devices " + _assert_same_computation(baseline, workdir))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_two(setup, workdir: Path) -> list[subprocess.Popen]:
    """Two processes x 2 CPU devices on one machine (jax.distributed, gloo collectives)."""
    port = _free_port()
    processes = []
    for process_id in range(2):
        env = _env(setup, devices=2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
        processes.append(subprocess.Popen(_command(setup, workdir), env=env, cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    return processes


def _finish_all(processes: list[subprocess.Popen]) -> list[str]:
    try:
        return [_finish(process) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def two_processes(setup, runs):
    """An uninterrupted two-process run, and one whose processes both get SIGTERM once they
    have started, then restarted (the single-process runs are done: their programs are in the
    compilation cache)."""
    root = setup["root"]
    outputs = {"whole": _finish_all(_start_two(setup, root / "two_processes"))}
    processes = _start_two(setup, root / "two_processes_stopped")
    try:
        heads = [_read_until(process, "from step 0") for process in processes]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        outputs["stopped"] = [h + o for h, o in zip(heads, _finish_all(processes))]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    outputs["stopped_steps"] = _steps(root / "two_processes_stopped")
    outputs["restart"] = _finish_all(_start_two(setup, root / "two_processes_stopped"))
    return outputs


def test_two_processes_compute_what_one_process_computes(setup, runs, two_processes):
    """2 processes x 2 devices train on the same global batches as 1 process x 4 devices (each
    process loads its rows of every batch): same parameters, statistics and losses; both
    processes checkpoint together (one data state each) and agree on the validation metrics."""
    workdir = setup["root"] / "two_processes"
    outputs = two_processes["whole"]
    assert "over 4 device(s), 2 process(es)" in outputs[0]
    print("2 processes x 2 devices vs 1 x 4 " + _assert_same_computation(
        runs[0]["four_devices"], workdir))
    final = workdir / "checkpoints" / str(TOTAL_STEPS)
    assert sorted(p.name for p in (final / "data").iterdir()) == [
        "process_0-of-2.bytes", "process_1-of-2.bytes"]
    assert (workdir / "model" / "config.json").is_file()
    last = [[line.split(";", 1)[1] for line in out.splitlines() if line.startswith("done:")]
            for out in outputs]
    assert last[1] and last[0] == last[1]
    from rep_medsam_jax.model_dir import load_model_dir

    _, variables = load_model_dir(workdir / "model")
    np.testing.assert_array_equal(variables["params"]["mask_decoder"]["iou_token"],
                                  _state(workdir, TOTAL_STEPS)[
                                      "['params']['mask_decoder']['iou_token']"])


def test_two_processes_stopped_by_sigterm_resume_bit_identical(setup, two_processes):
    root = setup["root"]
    stopped = two_processes["stopped"]
    saved = two_processes["stopped_steps"][-1]
    assert saved < TOTAL_STEPS
    # Both processes stopped after the same step, the one they saved together.
    for output in stopped:
        assert f"stopped by SIGTERM at step {saved}/{TOTAL_STEPS}" in output, output[-2000:]
    assert all("resumed from" in output for output in two_processes["restart"])
    _assert_same_state(_state(root / "two_processes_stopped", TOTAL_STEPS),
                       _state(root / "two_processes", TOTAL_STEPS))
    for name in ("process_0-of-2", "process_1-of-2"):
        assert _data_state(root / "two_processes_stopped", TOTAL_STEPS, name) == _data_state(
            root / "two_processes", TOTAL_STEPS, name)
