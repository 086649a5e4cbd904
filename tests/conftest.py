"""Shared fixtures: a tiny random model directory and its ONNX export, built once per worker."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised ``rep_medsam_tiny`` model directory (training form, unfolded)."""
    import jax
    import numpy as np

    from rep_medsam_jax.model_dir import save_model_dir
    from rep_medsam_jax.models.config import MODEL_PRESETS
    from rep_medsam_jax.models.medsam_lite import init_variables

    config = MODEL_PRESETS["rep_medsam_tiny"]
    variables = init_variables(config, jax.random.key(0))
    # Non-trivial BatchNorm statistics, so that folding is exercised for real.
    rng = np.random.default_rng(0)
    stats = jax.tree_util.tree_map(np.asarray, variables["batch_stats"])

    def perturb(path, leaf):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

    variables["batch_stats"] = jax.tree_util.tree_map_with_path(perturb, stats)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model_dir(path, config, variables)
    return path


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_model_dir, tmp_path_factory):
    """``rep-medsam export`` of the tiny model (fp32 only)."""
    from rep_medsam_jax.export.onnx_export import export_model_dir

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    path = tmp_path_factory.mktemp("exports") / "tiny"
    export_model_dir(tiny_model_dir, path, log=lambda message: None)
    return path


@pytest.fixture(scope="session")
def torch_rep_medsam(tmp_path_factory):
    """A randomly initialised full-size PyTorch Rep-MedSAM (SPEC §1 + segment-anything heads),
    saved as an unwrapped state dict: ``(model, checkpoint_path)``."""
    import torch

    from rep_medsam_jax.models.config import REPVIT_VARIANTS
    from tests.reference.medsam_lite_torch import build_reference_model

    model = build_reference_model(REPVIT_VARIANTS["rep_medsam_m1_0"].rows, seed=1)
    path = tmp_path_factory.mktemp("torch") / "rep_medsam.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="session")
def converted_rep_medsam(torch_rep_medsam, tmp_path_factory):
    """``rep-medsam convert --from rep-medsam`` of that checkpoint: the MODEL_DIR path."""
    from rep_medsam_jax.cli import main

    out = tmp_path_factory.mktemp("converted") / "rep_medsam"
    assert main(["convert", "--from", "rep-medsam", str(torch_rep_medsam[1]), "-o", str(out)]) == 0
    return out


# The two longest test files (the demo, ~6-8 min; the training loop's runs, ~7 min) go first in
# collection order: `pytest -n 2 --dist loadfile` hands files to workers in that order, so each
# worker starts one of them instead of one worker meeting the training loop at the end of the
# run while the other idles (the last clean-clone run: 963 s for ~1,700 s of work on 2 workers).
SLOW_FILES_FIRST = ("test_demo.py", "test_training_loop.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

    items.sort(key=rank)        # stable: every other file keeps its place and its test order
