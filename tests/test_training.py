"""Training pieces: optimiser rules against PyTorch, the jitted steps on the tiny model,
checkpoint retention, and configuration errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rep_medsam_jax.models.config import MODEL_PRESETS, ViTConfig
from rep_medsam_jax.models.medsam_lite import build_model
from rep_medsam_jax.training import optim
from rep_medsam_jax.training import steps as steps_lib
from rep_medsam_jax.training.checkpoint import Checkpointer
from rep_medsam_jax.training.config import (ConfigError, DataSection, ModelSection, TrainConfig,
                                            apply_overrides, validate)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32            # tiny model at 32 x 32: an 8 x 8 embedding, a 32 x 32 mask


# --------------------------------------------------------------------------------------------
# Optimiser rules
# --------------------------------------------------------------------------------------------

def test_reduce_on_plateau_follows_torch_and_lowers_the_rate():
    torch = pytest.importorskip("torch")
    config = optim.OptimConfig(learning_rate=1.0, plateau_factor=0.5, plateau_patience=2,
                               plateau_cooldown=1)
    params = {"image_encoder": {"w": jnp.zeros(3)}}
    opt_state = optim.make_optimizer(dataclasses.replace(config, trainable=("image_encoder",)),
                                     params).init(params)
    weight = torch.nn.Parameter(torch.zeros(1))
    reference_opt = torch.optim.SGD([weight], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        reference_opt, mode="min", factor=0.5, patience=2, threshold=1e-4, cooldown=1)
    # Improves, then stalls (tiny relative gains below the 1e-4 threshold count as stalls).
    values = [1.0, 0.9, 0.8, 0.8, 0.79999, 0.8, 0.81, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    ours, theirs = [], []
    for value in values:
        opt_state = optim.apply_plateau(opt_state, value, config)
        reference.step(value)
        ours.append(float(optim.learning_rate(opt_state, config)))
        theirs.append(reference_opt.param_groups[0]["lr"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert ours[-1] < ours[0]            # the rate did go down when the metric stalled


def test_percentile_clip_follows_torch_clip_grad_norm():
    torch = pytest.importorskip("torch")
    transform = optim.clip_by_history_percentile(90.0, history=64)
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,)}
    state = transform.init(None)
    history = []
    for scale in [1.0, 2.0, 0.5, 10.0, 1.0, 3.0, 30.0, 0.1]:
        grads = {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in shapes.items()}
        clipped, state = transform.update(jax.tree.map(jnp.asarray, grads), state)
        tensors = {k: torch.nn.Parameter(torch.zeros(s)) for k, s in shapes.items()}
        for k, t in tensors.items():
            t.grad = torch.from_numpy(grads[k].copy())
        norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum())
                                 for g in grads.values())))
        history.append(norm)
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), float(np.percentile(history, 90)))
        for k in shapes:
            np.testing.assert_allclose(clipped[k], tensors[k].grad.numpy(), rtol=2e-5, atol=1e-7)


def test_accumulation_averages_gradients_over_k_batches():
    config = optim.OptimConfig(learning_rate=0.1, clip="none", weight_decay=0.0,
                               accumulation_steps=2, trainable=("image_encoder",))
    params = {"image_encoder": {"w": jnp.array([1.0, -2.0])}}
    tx = optim.make_optimizer(config, params)
    state = tx.init(params)
    g1 = {"image_encoder": {"w": jnp.array([1.0, 3.0])}}
    g2 = {"image_encoder": {"w": jnp.array([3.0, -1.0])}}
    updates, state = tx.update(g1, state, params)
    assert float(jnp.abs(updates["image_encoder"]["w"]).max()) == 0.0     # waits for batch 2
    updates, state = tx.update(g2, state, params)
    # One AdamW step on the mean gradient (2, 1): the first Adam update is -lr * sign.
    single = optim.make_optimizer(dataclasses.replace(config, accumulation_steps=1), params)
    expected, _ = single.update({"image_encoder": {"w": jnp.array([2.0, 1.0])}},
                                single.init(params), params)
    np.testing.assert_allclose(updates["image_encoder"]["w"], expected["image_encoder"]["w"],
                               rtol=1e-6)
    # The plateau state is found inside optax.MultiSteps' state too.
    assert float(optim.learning_rate(optim.apply_plateau(state, 1.0, config), config)) == \
        pytest.approx(0.1)


def test_bad_optimiser_values_are_rejected():
    with pytest.raises(ValueError, match="learning_rate"):
        optim.OptimConfig(learning_rate=-1e-4).validate()
    with pytest.raises(ValueError, match="unknown parts"):
        optim.OptimConfig(trainable=("decoder",)).validate()


# --------------------------------------------------------------------------------------------
# Steps on the tiny model
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """(model, variables, batch of 8 phantom examples at 32 x 32)."""
    from input_pipeline.phantoms import make_case_2d
    from rep_medsam_jax.models.medsam_lite import init_variables

    config = dataclasses.replace(MODEL_PRESETS["rep_medsam_tiny"], image_size=SIZE,
                                 embedding_size=SIZE // 4)
    model = build_model(config)
    variables = init_variables(config, 0)
    examples = []
    for index, modality in enumerate(["CT", "MR", "US", "Dermoscopy"] * 2):
        case = make_case_2d(np.random.default_rng([7, index]), modality, SIZE)
        label = 1 + index % int(case.gts.max())
        examples.append((case.imgs.astype(np.float32) / 255.0, case.gts == label,
                         case.boxes[label - 1]))
    batch = {"image": jnp.asarray(np.stack([e[0] for e in examples])),
             "mask": jnp.asarray(np.stack([e[1] for e in examples]).astype(np.uint8)),
             "box": jnp.asarray(np.stack([e[2] for e in examples]).astype(np.int32))}
    return model, variables, batch


def _state(variables, config):
    tx = optim.make_optimizer(config, variables["params"])
    return tx, steps_lib.create_train_state(jax.tree.map(jnp.asarray, variables), tx,
                                            jax.random.PRNGKey(1))


def _subtree_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                    jax.tree_util.tree_leaves(b)))


SEG_OPTIM = optim.OptimConfig(learning_rate=3e-3, clip="percentile", clip_history=32)


@pytest.fixture(scope="module")
def seg_run(tiny):
    """Eight float32 seg steps on one batch: (first state, first metrics, last state, losses,
    the jitted steps). Compiled once, shared by the tests below."""
    model, variables, batch = tiny
    tx, state = _state(variables, SEG_OPTIM)
    steps = steps_lib.jit_steps("seg", model, tx, steps_lib.StepOptions(), donate=False)
    first_metrics = None
    losses = []
    current = state
    for index in range(8):
        current, metrics = steps.train(current, batch, jax.random.PRNGKey(index))
        first_metrics = first_metrics or metrics
        losses.append(float(metrics["loss"]))
    return state, first_metrics, current, losses, steps


def test_part_labels_freeze_parts_and_buffers(tiny):
    _, variables, _ = tiny
    labels = optim.part_labels(variables["params"], ("mask_decoder",))
    flat = {jax.tree_util.keystr(k): v
            for k, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert {v for k, v in flat.items() if "mask_decoder" in k} == {"trainable"}
    assert {v for k, v in flat.items() if "mask_decoder" not in k} == {"frozen"}
    labels = optim.part_labels(variables["params"], optim.MODEL_PARTS)
    frozen = [k for k, v in jax.tree_util.tree_flatten_with_path(labels)[0] if v == "frozen"]
    # The Gaussian PE matrix is a buffer in the reference: never trained, never decayed.
    assert [jax.tree_util.keystr(k) for k in frozen] == [
        "['prompt_encoder']['pe_layer']['positional_encoding_gaussian_matrix']"]


@pytest.mark.slow
def test_seg_step_trains_every_part_updates_batchnorm_and_lowers_the_loss(seg_run, tiny):
    _, variables, _ = tiny
    first, metrics, last, losses, _ = seg_run
    assert int(last.step) == 8
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert not _subtree_equal(last.batch_stats, first.batch_stats)
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        assert not _subtree_equal(last.params[part], variables["params"][part]), part
    gaussian = ("prompt_encoder", "pe_layer", "positional_encoding_gaussian_matrix")
    np.testing.assert_array_equal(last.params[gaussian[0]][gaussian[1]][gaussian[2]],
                                  variables["params"][gaussian[0]][gaussian[1]][gaussian[2]])
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights(seg_run, tiny):
    model, variables, batch = tiny
    _, _, trained, _, float32_steps = seg_run
    _, float32_metrics = float32_steps.train(trained, batch, jax.random.PRNGKey(0))
    tx = optim.make_optimizer(SEG_OPTIM, variables["params"])
    step = steps_lib.jit_steps("seg", model, tx, steps_lib.StepOptions(compute_dtype="bfloat16"),
                               donate=False).train
    new_state, metrics = step(trained, batch, jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(new_state.params)} == {
        jnp.dtype("float32")}
    print("loss float32", float(float32_metrics["loss"]), "bfloat16", float(metrics["loss"]))
    assert float(metrics["loss"]) == pytest.approx(float(float32_metrics["loss"]), rel=0.05)


def test_eval_step_ignores_padding(seg_run, tiny):
    _, _, batch = tiny
    _, _, state, _, steps = seg_run
    options = steps_lib.StepOptions()
    half = {k: v[:4] for k, v in batch.items()}
    padded = {k: jnp.concatenate([v, v[::-1]]) for k, v in half.items()}   # junk after 4
    padded["weight"] = jnp.array([1.0] * 4 + [0.0] * 4)
    from_padded = steps_lib.finalize_eval(jax.device_get(steps.evaluate(state, padded)),
                                          options, "seg")
    doubled = {k: jnp.concatenate([v, v]) for k, v in half.items()}
    doubled["weight"] = jnp.ones(8)
    from_doubled = steps_lib.finalize_eval(jax.device_get(steps.evaluate(state, doubled)),
                                           options, "seg")
    assert from_padded["count"] == 4 and from_doubled["count"] == 8
    for key in ("dsc", "dice", "bce", "iou", "loss"):
        assert from_padded[key] == pytest.approx(from_doubled[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_distillation_lowers_student_teacher_mse_by_half(tiny):
    """A random ViT teacher with an 8 x 8 x 64 embedding (the tiny student's shape) at 128 x 128,
    run online inside the step; the MSE is measured against its precomputed targets (what a
    teacher cache holds)."""
    from rep_medsam_jax.losses import distill_mse
    from rep_medsam_jax.models.vit import ViTImageEncoder

    model, variables, batch = tiny
    vit = ViTConfig(name="vit_test", img_size=128, embed_dim=32, depth=2, num_heads=2,
                    window_size=4, global_attn_indexes=(1,), out_chans=64)
    encoder = ViTImageEncoder(vit)
    teacher_variables = {"params": jax.jit(encoder.init)(
        jax.random.key(3, impl="rbg"), jnp.zeros((1, 128, 128, 3)))["params"]}
    teacher = steps_lib.Teacher(encoder, vit.img_size)
    target = jax.jit(lambda v, x: steps_lib.teacher_embeddings(teacher, v, x, jnp.float32))(
        teacher_variables, batch["image"])
    assert target.shape == (8, 8, 8, 64)

    @jax.jit
    def mse(state):
        embedding, _ = model.apply(state.variables(), batch["image"], method="encode")
        return distill_mse(embedding, target)

    config = optim.OptimConfig(learning_rate=3e-3, clip="none", trainable=("image_encoder",))
    options = steps_lib.StepOptions(trainable=config.trainable)
    tx, state = _state(variables, config)
    online = steps_lib.jit_steps("distill", model, tx, options, teacher, teacher_variables)
    before = float(mse(state))
    heads = jax.tree.map(np.asarray, {k: state.params[k]
                                      for k in ("prompt_encoder", "mask_decoder")})
    first_stats = jax.tree.map(np.asarray, state.batch_stats)
    for index in range(30):
        state, metrics = online.train(state, batch, jax.random.PRNGKey(index))
    after = float(mse(state))
    print(f"distillation MSE {before:.4f} -> {after:.4f} in 30 steps")
    assert after <= 0.5 * before, (before, after)
    assert _subtree_equal(heads, {k: state.params[k] for k in heads})     # frozen heads
    assert not _subtree_equal(first_stats, state.batch_stats)             # train-mode BN
    # The cached path: the batch's teacher_embedding is the target the step uses.
    cached = steps_lib._distill_target({"teacher_embedding": target.astype(jnp.float16)}, None,
                                       None, batch["image"], jnp.float32)
    np.testing.assert_allclose(cached, target, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def _small_state():
    params = {"image_encoder": {"w": jnp.arange(6.0).reshape(2, 3)},
              "prompt_encoder": {"b": jnp.zeros(2)}, "mask_decoder": {"c": jnp.ones(4)}}
    config = optim.OptimConfig(clip_history=8)
    tx = optim.make_optimizer(config, params)
    return steps_lib.create_train_state({"params": params, "batch_stats": {}}, tx,
                                        jax.random.PRNGKey(0))


def test_checkpointer_keeps_last_n_and_best_and_ignores_half_written(tmp_path):
    state = _small_state()
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep_last=2, best_metric="val/dsc", best_mode="max")
    dscs = {1: 0.5, 2: 0.9, 3: None, 4: 0.6, 5: None, 6: 0.7}
    for step, dsc in dscs.items():
        checkpointer.save(step, state.replace(step=jnp.int32(step)), f"data{step}".encode(),
                          {"note": "x"}, None if dsc is None else {"val/dsc": dsc})
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 5, 6]          # best (2) + the last two
    assert checkpointer.best_step() == 2
    checkpointer.close()

    # A save killed half-way leaves orbax's temporary directory: never picked up, cleaned up.
    half = directory / "7.orbax-checkpoint-tmp-1234567"
    (half / "state").mkdir(parents=True)
    (half / "state" / "garbage").write_bytes(b"\0" * 10)
    reopened = Checkpointer(directory, keep_last=2)
    assert reopened.latest_step() == 6
    restored, data_state, meta = reopened.restore(6, state)
    assert data_state == b"data6" and meta["note"] == "x" and meta["metrics"] == {"val/dsc": 0.7}
    assert int(restored.step) == 6
    for a, b in zip(jax.tree_util.tree_leaves(restored.opt_state),
                    jax.tree_util.tree_leaves(state.opt_state)):
        np.testing.assert_array_equal(a, b)
    reopened.close()
    assert not half.exists()


# --------------------------------------------------------------------------------------------
# Configuration errors (before any compute)
# --------------------------------------------------------------------------------------------

def _phantom_config(**changes) -> TrainConfig:
    base = TrainConfig(model=ModelSection(preset="rep_medsam_tiny", image_size=SIZE),
                       data=DataSection(phantoms=(4, 0), phantom_image_size=SIZE), batch_size=4)
    return dataclasses.replace(base, **changes)


def test_config_errors_are_clear(tmp_path, monkeypatch):
    validate(_phantom_config(), tmp_path / "ok", device_count=4)
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        validate(apply_overrides(_phantom_config(), ["optim.learning_rate=-1e-4"]))
    with pytest.raises(ConfigError, match="not divisible by the number of devices"):
        validate(_phantom_config(batch_size=6), device_count=4)
    with pytest.raises(ConfigError, match="does not exist"):
        validate(_phantom_config(data=DataSection(dataset_dir=str(tmp_path / "missing"))))
    with pytest.raises(ConfigError, match="dataset_dir is empty"):
        validate(_phantom_config(data=DataSection()))
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_json({"optim": {"learnin_rate": 1.0}})
    with pytest.raises(ConfigError, match="no key"):
        apply_overrides(_phantom_config(), ["optim.lr=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(_phantom_config(), ["batch_size=abc"])
    with pytest.raises(ConfigError, match="teacher_cache_dir"):
        validate(_phantom_config(stage="distill"))
    # A URL is checked before any compute: a scheme the storage layer serves, with its package.
    with pytest.raises(ConfigError, match=r"--workdir: ftp://b/run: unsupported URL scheme"):
        validate(_phantom_config(), "ftp://b/run")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gcsfs" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"model.init_from: gs://b/distill: .*needs the gcsfs"):
        validate(apply_overrides(_phantom_config(), ["model.init_from=gs://b/distill"]))


def _fake_checkpoint(workdir: Path, model_json: dict) -> None:
    meta = workdir / "checkpoints" / "3" / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"model": model_json, "stage": "seg"}))


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    full = MODEL_PRESETS["rep_medsam"].to_json()
    _fake_checkpoint(tmp_path / "run", full)
    with pytest.raises(ConfigError, match="holds checkpoints of a repvit:rep_medsam_m1_0"):
        validate(_phantom_config(), tmp_path / "run")
    # The same model is accepted.
    _fake_checkpoint(tmp_path / "same", dataclasses.replace(
        MODEL_PRESETS["rep_medsam_tiny"], image_size=SIZE, embedding_size=SIZE // 4).to_json())
    validate(_phantom_config(), tmp_path / "same")
    # init_from a workdir of another variant.
    config = _phantom_config(model=ModelSection(preset="rep_medsam_tiny", image_size=SIZE,
                                                init_from=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="another variant"):
        validate(config)


def test_train_cli_fails_fast_with_a_clear_message(tmp_path):
    def train(*overrides):
        return subprocess.run(
            [sys.executable, str(REPO / "train.py"), "--config",
             str(REPO / "configs" / "local.py"), "--workdir", str(tmp_path / "w"), *overrides],
            capture_output=True, text=True, cwd=REPO, timeout=120)

    result = train("--config.optim.learning_rate=-0.001")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: optim.learning_rate must be > 0, got -0.001")
    # A value of the wrong type or an unknown key: refused while parsing the flags.
    result = train("--config.batch_size=abc")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: flag --config.batch_size=abc: invalid literal for int() with base 10: "
        "'abc'"]
    result = train("--config.optim.learnin_rate=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: --config: unknown key 'learnin_rate' (did you mean 'learning_rate'?)"]
    assert not (tmp_path / "w").exists()                 # nothing was started
    assert "Traceback" not in result.stderr              # refused by the check, not a crash


def test_config_files_are_config_dicts_with_typed_overrides():
    """configs/*.py return ml_collections ConfigDicts that round-trip to the dataclasses; a
    mapping with an unknown key or a wrong type is refused with the key's name."""
    import ml_collections

    from rep_medsam_jax.training.config import as_config_dict, from_config_dict, load_config

    for path in sorted((REPO / "configs").glob("*.py")):
        config = load_config(path)
        assert isinstance(as_config_dict(config), ml_collections.ConfigDict)
        assert from_config_dict(as_config_dict(config)) == config, path.name
    stage = load_config(REPO / "configs" / "finetune.py")
    assert stage.checkpoint_every_minutes > 0        # time-based checkpoints on in the stages
    changed = as_config_dict(stage)
    changed.data.phantoms = (4, 0)
    changed.optim.trainable = ("mask_decoder",)
    assert from_config_dict(changed).data.phantoms == (4, 0)
    assert from_config_dict(changed).optim.trainable == ("mask_decoder",)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_config_dict({**stage.to_json(), "bach_size": 4})
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        from_config_dict({**stage.to_json(), "batch_size": "four"})
