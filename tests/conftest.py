"""Shared fixtures: a tiny random model directory and its ONNX export, built once per worker;
a random full-size PyTorch Rep-MedSAM and its conversion."""

from __future__ import annotations

import logging

import numpy as np
import pytest


def randomise_batchnorm(config, variables: dict, seed: int) -> dict:
    """Every BatchNorm of a training-form model made non-trivial, as the PyTorch reference's
    ``randomize()`` does with calibration images: weight U(0.5, 1.5), bias N(0, 0.1); running
    statistics those of four noise images (a train-mode pass), the mean shifted by N(0, 0.1) of
    the channel's standard deviation, the variance scaled by U(0.5, 2).

    RepViT initialises each channel mixer's last BN weight to 0, which makes a block without a
    skip (the tiny variant's width change) output a constant; and statistics that do not match
    the activations let the image-dependent part fade layer after layer. Either way the
    embedding would hardly depend on the image, and the stem, stages and gates would go unseen.

    variables: {"params", "batch_stats"} of a training-form model -> a new dict, same shapes.
    """
    import jax

    from rep_medsam_jax.models.medsam_lite import MedSAMLite, build_model
    from rep_medsam_jax.models.repvit import BN_MOMENTUM

    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    stats = jax.tree_util.tree_map(np.asarray, variables["batch_stats"])
    # A BatchNorm is where batch_stats has an entry; its scale and bias sit at the same path.
    bn_paths = {tuple(p.key for p in path[:-1])
                for path, _ in jax.tree_util.tree_leaves_with_path(stats)}
    draws = {"scale": lambda s: rng.uniform(0.5, 1.5, s), "bias": lambda s: rng.normal(0, 0.1, s)}

    def draw(path, leaf):
        keys = tuple(p.key for p in path)
        if keys[:-1] in bn_paths and keys[-1] in draws:
            return draws[keys[-1]](leaf.shape).astype(np.float32)
        return leaf

    params = jax.tree_util.tree_map_with_path(draw, params)
    # From zero statistics, one train-mode pass leaves (1 - momentum) x the batch statistics.
    zeros = jax.tree_util.tree_map(np.zeros_like, stats)
    images = rng.random((4, config.image_size, config.image_size, 3), dtype=np.float32)
    _, updated = build_model(config).apply({"params": params, "batch_stats": zeros}, images,
                                           train=True, method=MedSAMLite.encode,
                                           mutable=["batch_stats"])
    batch = jax.tree_util.tree_map(lambda x: np.asarray(x) / (1 - BN_MOMENTUM),
                                   updated["batch_stats"])

    def perturb(path, leaf):
        if path[-1].key == "var":
            return (leaf * rng.uniform(0.5, 2.0, leaf.shape)).astype(np.float32)
        var = batch
        for p in path[:-1]:
            var = var[p.key]
        return (leaf + 0.1 * np.sqrt(var["var"]) * rng.normal(size=leaf.shape)).astype(np.float32)

    return {"params": params, "batch_stats": jax.tree_util.tree_map_with_path(perturb, batch)}


def assert_embedding_depends_on_the_image(config, variables) -> None:
    """Two different images must give clearly different embeddings (max difference above
    10 % of the largest value), or tests comparing backends on this model would compare
    constants."""
    import jax

    from rep_medsam_jax.models.medsam_lite import MedSAMLite, build_model

    model = build_model(config)
    images = np.random.default_rng(1).random((2, config.image_size, config.image_size, 3))
    embeddings, _ = jax.jit(lambda x: model.apply(variables, x, method=MedSAMLite.encode))(
        images.astype(np.float32))
    embeddings = np.asarray(embeddings)
    difference = np.abs(embeddings[0] - embeddings[1]).max()
    assert difference > 0.1 * np.abs(embeddings).max(), (
        f"the embedding hardly depends on the image (max difference {difference:.2e})")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised ``rep_medsam_tiny`` model directory (training form, unfolded),
    every BatchNorm randomised, its embedding checked to depend on the image."""
    import jax

    from rep_medsam_jax.model_dir import save_model_dir
    from rep_medsam_jax.models.config import MODEL_PRESETS
    from rep_medsam_jax.models.medsam_lite import init_variables

    config = MODEL_PRESETS["rep_medsam_tiny"]
    variables = randomise_batchnorm(config, init_variables(config, jax.random.key(0)), seed=0)
    assert_embedding_depends_on_the_image(config, variables)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model_dir(path, config, variables)
    return path


@pytest.fixture
def predict_encodes_one_slice_per_call(monkeypatch):
    """predict encodes one volume slice per call, as the interactive segmenter does.

    predict normally encodes 4 slices per call: onnxruntime runs such a batch over sessions with
    fewer threads each, which moves embeddings by ~1e-6 and can flip a boundary pixel of
    random-weight masks. With both sides one per call, the masks compared come from the same
    embeddings."""
    from rep_medsam_jax.predictor import cases

    monkeypatch.setattr(cases, "ENCODE_CHUNK", 1)


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
    """A randomly initialised full-size PyTorch Rep-MedSAM (the RepViT m1.0 reference encoder,
    every BatchNorm randomised, + segment-anything's heads), saved as an unwrapped state dict:
    ``(model, checkpoint_path)``."""
    import torch

    from rep_medsam_jax.models.config import REPVIT_VARIANTS
    from tests.reference.medsam_lite_torch import build_reference_model

    model = build_reference_model(REPVIT_VARIANTS["rep_medsam_m1_0"].rows, seed=1)
    with torch.no_grad():
        embeddings = model.image_encoder(torch.rand(2, 3, 256, 256,
                                                    generator=torch.Generator().manual_seed(1)))
    difference = (embeddings[0] - embeddings[1]).abs().max()
    assert difference > 0.1 * embeddings.abs().max(), "the embedding ignores the image"
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


# The two longest test files (the demo; the training loop's runs) go first in collection order:
# `pytest -n 2 --dist loadfile` hands files to workers in that order, so each worker starts one
# of them instead of one worker meeting a long file at the end of the run while the other idles.
SLOW_FILES_FIRST = ("test_demo.py", "test_training_loop.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

    items.sort(key=rank)        # stable: every other file keeps its place and its test order
