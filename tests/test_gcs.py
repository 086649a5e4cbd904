"""Training on ``gs://`` end to end, against a real storage server on this machine
(gcp-storage-emulator, tests/gcs_emulator.py): every file of the run is an object in its bucket.

1. a phantom dataset built into ``gs://BUCKET/data`` (built locally, uploaded) and a MODEL_DIR
   written to ``gs://BUCKET/init`` (the heads the student starts from);
2. the teacher cache of the train split filled on gs:// by its command line (a random vit_demo);
3. ``train.py`` distilling from that cache with ``--workdir gs://BUCKET/run`` and
   ``model.init_from`` on gs://, stopped after 3 steps (checkpoint at step 2), then resumed by
   the same command to step 4, which exports WORKDIR/model.

Checked: the resumed run starts from the gs:// checkpoint of step 2, metrics.jsonl on gs:// reads
as one run (steps 1-4 once each), the export on gs:// loads and holds the final checkpoint's
weights, and the frozen heads are exactly those of the gs:// init_from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gcp_storage_emulator",
                    reason="gcp-storage-emulator (the test extra) runs the local storage server")

from tests.gcs_emulator import gcs_emulator, this_process_uses  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BUCKET = "rep-medsam-test"
URL = f"gs://{BUCKET}"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """The emulator's environment, applied to this process too while the module runs."""
    root = tmp_path_factory.mktemp("gcs")
    with gcs_emulator(root / "objects", BUCKET) as environment, this_process_uses(environment):
        yield {"env": environment, "root": root}


def _run(bucket, *command: str) -> str:
    env = {**os.environ, **bucket["env"], "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XDG_CACHE_HOME": str(bucket["root"] / "user_cache")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, *command], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    print(f"{' '.join(command[:2])}: {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _model_config():
    import dataclasses

    from rep_medsam_jax.models.config import MODEL_PRESETS

    return dataclasses.replace(MODEL_PRESETS["rep_medsam_tiny"], image_size=64,
                               embedding_size=16)


def _forget_listings() -> None:
    """Drop this process's gcsfs listing cache: the subprocesses wrote behind its back."""
    import fsspec

    fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()


@pytest.fixture(scope="module")
def pipeline(bucket):
    from input_pipeline.phantoms import write_phantom_dataset
    from input_pipeline.remote_build import build_dataset_at
    from input_pipeline.tfds_builder import BuildOptions
    from rep_medsam_jax.model_dir import save_model_dir
    from rep_medsam_jax.models.medsam_lite import init_variables
    from rep_medsam_jax.training.config import (DataSection, ModelSection, TeacherSection,
                                                TrainConfig)
    from rep_medsam_jax.training.optim import OptimConfig

    root = bucket["root"]
    cases = write_phantom_dataset(root / "phantoms", n2d=8, n3d=0, seed=0, size_2d=64,
                                  modalities_2d=("CT", "MR", "US", "Dermoscopy"))
    built = build_dataset_at(cases.inputs_dir.parent, f"{URL}/data",
                             BuildOptions(image_size=64, validation_fraction=0.25),
                             log=lambda message: None)
    dataset = str(built.dataset_dir)
    init = save_model_dir(f"{URL}/init", _model_config(), init_variables(_model_config(), 7))

    cache_output = _run(bucket, "-m", "input_pipeline.teacher_cache", "--dataset-dir", dataset,
                        "--split", "train", "--out", f"{URL}/cache/train", "--random-init", "0",
                        "--variant", "vit_demo", "--batch-size", "4",
                        # 32 KiB per slice: two slices per shard, so several shard files.
                        "--shard-mb", "0.07")
    config = TrainConfig(
        name="gcs", stage="distill",
        model=ModelSection(preset="rep_medsam_tiny", image_size=64, init_from=str(init),
                           init_parts=("prompt_encoder", "mask_decoder")),
        data=DataSection(dataset_dir=dataset, teacher_cache_dir=f"{URL}/cache/train",
                         augment="distill"),
        teacher=TeacherSection(source="cache"),
        optim=OptimConfig(learning_rate=1e-3, clip="none", trainable=("image_encoder",)),
        batch_size=4, total_steps=4, eval_every_steps=2, checkpoint_every_steps=2,
        best_metric="", log_every_steps=1, progress_bar=False)
    config_path = root / "config.py"
    config_path.write_text(
        "import json\n\nfrom rep_medsam_jax.training.config import TrainConfig, "
        "as_config_dict\n\n\ndef get_config():\n    return as_config_dict(TrainConfig.from_json("
        f"json.loads({json.dumps(config.to_json())!r})))\n")
    command = ["train.py", "--config", str(config_path), "--workdir", f"{URL}/run"]
    first = _run(bucket, *command, "--stop_after_steps=3")
    from rep_medsam_jax.training.checkpoint import finished_steps

    steps_after_stop = finished_steps(f"{URL}/run/checkpoints")
    resumed = _run(bucket, *command)
    _forget_listings()
    return {"dataset": dataset, "built": built, "init": init, "cache_output": cache_output,
            "first": first, "steps_after_stop": steps_after_stop, "resumed": resumed}


def test_dataset_and_teacher_cache_live_in_the_bucket(pipeline):
    from etils import epath

    from input_pipeline.loader import ExampleSource

    assert pipeline["dataset"].startswith(f"{URL}/data/med_sam_slices/size64/")
    assert (epath.Path(pipeline["dataset"]) / "build_params.json").is_file()
    # Read back through array_record's reader on gs://, with the teacher embeddings from gs://.
    source = ExampleSource(pipeline["dataset"], "train", f"{URL}/cache/train")
    assert len(source) == pipeline["built"].split_sizes["train"] > 0
    example = source[0]
    assert example["image"].shape == (64, 64, 3)
    assert example["teacher_embedding"].shape == (16, 16, 64)
    manifest = json.loads(epath.Path(f"{URL}/cache/train/manifest.json").read_text())
    shards = sorted(p.name for p in epath.Path(f"{URL}/cache/train/shards").iterdir())
    assert len(shards) == manifest["num_shards"] >= 2


def test_the_run_stops_then_resumes_from_its_gs_checkpoint(pipeline):
    from rep_medsam_jax.training.checkpoint import finished_steps
    from rep_medsam_jax.training.logger import read_jsonl

    assert pipeline["steps_after_stop"] == [2]
    assert f"resumed from {URL}/run/checkpoints/2" in pipeline["resumed"]
    assert "done: step 4/4" in pipeline["resumed"]
    assert finished_steps(f"{URL}/run/checkpoints") == [2, 4]
    rows = read_jsonl(f"{URL}/run/metrics.jsonl")
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4]          # step 3 of the stopped run dropped, redone once
    from etils import epath

    assert json.loads(epath.Path(f"{URL}/run/config.json").read_text())["stage"] == "distill"


def test_the_export_on_gs_loads_with_the_final_weights(pipeline):
    from rep_medsam_jax.model_dir import load_model_dir
    from rep_medsam_jax.training.checkpoint import load_checkpoint_variables

    config, variables = load_model_dir(f"{URL}/run/model")
    assert config == _model_config()
    final = _flat(load_checkpoint_variables(f"{URL}/run/checkpoints", 4))
    exported = _flat(variables)
    assert exported.keys() == final.keys()
    for key in final:
        np.testing.assert_array_equal(exported[key], final[key], err_msg=key)
    # Distillation froze the heads: they are the gs:// init_from's, bit for bit (seed 7; the
    # run's own initialisation is seed 0); the encoder was trained away from its seed-0 start.
    from rep_medsam_jax.models.medsam_lite import init_variables

    _, start = load_model_dir(pipeline["init"])
    start, fresh = _flat(start), _flat(init_variables(_model_config(), 0))
    heads = [k for k in start if "prompt_encoder" in k or "mask_decoder" in k]
    assert heads and any(not np.array_equal(start[k], fresh[k]) for k in heads)
    for key in heads:
        np.testing.assert_array_equal(exported[key], start[key], err_msg=key)
    encoder = [k for k in exported if "image_encoder" in k]
    assert any(not np.array_equal(exported[k], fresh[k]) for k in encoder)
