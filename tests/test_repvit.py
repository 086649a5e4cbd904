"""The RepViT encoder and its converter against the PyTorch reference in
tests/reference/repvit_torch.py and the original model's counts and shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rep_medsam_jax.convert.repvit import convert_repvit
from rep_medsam_jax.convert.state_dict import CheckpointMismatchError, StateDictReader
from rep_medsam_jax.models.config import REPVIT_VARIANTS, RepViTConfig
from rep_medsam_jax.models.folding import fold
from rep_medsam_jax.models.repvit import (RepViT, RepViTBlock, block_specs, count_params,
                                          init_repvit, se_reduced_channels)
from tests.reference import repvit_torch as ref

M1_0 = REPVIT_VARIANTS["rep_medsam_m1_0"]
TINY = REPVIT_VARIANTS["rep_medsam_tiny"]
PREFIX = "image_encoder."

# Per-feature parameter counts of the unfused m1.0 encoder.
M1_0_FEATURE_PARAMS = {
    "stem": 15_036, "block_1": 15_584, "block_2": 13_720, "block_3": 13_720,
    "block_4": 57_960, "block_5": 59_840, "block_6": 52_528, "block_7": 52_528,
    "block_8": 228_816,
    **{f"block_{n}": (230_776 if n % 2 == 1 else 205_408) for n in range(9, 23)},
    "block_23": 205_408, "block_24": 306_208, "block_25": 913_136, "block_26": 812_224,
    "neck": 705_536,
}


def _abstract_variables(config: RepViTConfig, deploy: bool) -> dict:
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(RepViT(config, deploy=deploy).init, jax.random.key(0), x)


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _torch_forward_nhwc(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(_to_nchw(x)).permute(0, 2, 3, 1).numpy()


def _convert(module: torch.nn.Module, config: RepViTConfig) -> dict:
    reader = StateDictReader(ref.state_dict_numpy(module, PREFIX), context="test")
    variables = convert_repvit(reader, PREFIX, config)
    reader.finish()
    return variables


# --- structure and counts (cheap: shapes only) ----------------------------------------------

def test_m1_0_parameter_counts_match_spec():
    unfused = _abstract_variables(M1_0, deploy=False)
    folded = _abstract_variables(M1_0, deploy=True)
    assert count_params(unfused) == 6_505_532
    assert count_params(folded) == 6_463_840
    assert "batch_stats" not in folded
    per_feature = {name: sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))
                   for name, tree in unfused["params"].items()}
    assert per_feature == M1_0_FEATURE_PARAMS


def test_torch_reference_matches_spec_counts_and_keys():
    module = ref.RepViT(M1_0.rows, M1_0.stem_strides, M1_0.neck_channels)
    keys = list(module.state_dict())
    assert len(keys) == 706
    assert sum(k.endswith("num_batches_tracked") for k in keys) == 106
    assert ref.parameter_count(module) == 6_505_532
    # Key layout details of the Rep-MedSAM checkpoint.
    assert "features.24.channel_mixer.0.c.weight" in keys
    assert "features.23.channel_mixer.m.0.c.weight" in keys
    assert "features.4.token_mixer.2.c.weight" in keys
    assert "features.9.token_mixer.1.fc1.weight" in keys
    assert module.state_dict()["features.25.token_mixer.1.fc1.weight"].shape == (112, 448, 1, 1)
    ref.replace_batchnorm(module)
    assert len(module.state_dict()) == 210
    assert ref.parameter_count(module) == 6_463_840


def test_m1_0_block_layout_and_feature_shapes_at_256():
    specs = {s.index: s for s in block_specs(M1_0)}
    assert [i for i, s in specs.items() if s.kind == "downsample"] == [4, 8]
    assert [i for i, s in specs.items() if s.kind == "transition"] == [24]
    assert [i for i, s in specs.items() if s.use_se] == [1, 5, 9, 11, 13, 15, 17, 19, 21, 25]
    assert [se_reduced_channels(c) for c in (56, 112, 224, 448)] == [16, 32, 56, 112]
    assert specs[24].hidden_channels == 448 and specs[25].hidden_channels == 896
    assert specs[4].hidden_channels == 224

    variables = _abstract_variables(M1_0, deploy=False)
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    embedding, features = jax.eval_shape(RepViT(M1_0).apply, variables, x)
    assert embedding.shape == (1, 64, 64, 256)
    assert {k: v.shape for k, v in features.items()} == {
        "stem": (1, 256, 256, 56), "stage1": (1, 256, 256, 56),
        "stage2": (1, 128, 128, 112), "stage3": (1, 64, 64, 224),
        "stage4": (1, 64, 64, 448), "neck_in": (1, 64, 64, 448)}


# --- full size parity (the expensive ones) ---------------------------------------------------

@pytest.fixture(scope="module")
def m1_0_case():
    # BatchNorm statistics calibrated on noise images: the embedding depends on the image.
    calibration = torch.rand(4, 3, 256, 256, generator=torch.Generator().manual_seed(70))
    module = ref.build_reference(M1_0.rows, M1_0.stem_strides, M1_0.neck_channels, seed=7,
                                 calibration=calibration)
    x = np.random.default_rng(7).random((1, 256, 256, 3), dtype=np.float32)
    variables = _convert(module, M1_0)
    y_torch = _torch_forward_nhwc(module, x)
    y_jax, _ = jax.jit(RepViT(M1_0).apply)(variables, x)
    return {"module": module, "x": x, "variables": variables, "y_torch": y_torch,
            "y_jax": np.asarray(y_jax)}


@pytest.mark.slow
def test_m1_0_converted_matches_torch(m1_0_case):
    y_jax, y_torch = m1_0_case["y_jax"], m1_0_case["y_torch"]
    assert y_jax.shape == (1, 64, 64, 256)
    assert np.abs(y_torch).max() > 1.0             # LayerNorm output: O(1), not vanishing
    diff = np.abs(y_jax - y_torch).max()
    print(f"m1_0 unfused JAX vs torch max abs diff: {diff:.3g}")
    assert diff < 9e-5                                  # 5x the measured 1.8e-5


@pytest.mark.slow
def test_m1_0_folded_matches_torch_fused_and_unfused(m1_0_case):
    folded = fold(m1_0_case["variables"], M1_0)
    assert count_params(folded) == 6_463_840
    y_folded, _ = jax.jit(RepViT(M1_0, deploy=True).apply)(folded, m1_0_case["x"])
    module = m1_0_case["module"]
    ref.replace_batchnorm(module)
    y_torch_fused = _torch_forward_nhwc(module, m1_0_case["x"])
    vs_torch = np.abs(np.asarray(y_folded) - y_torch_fused).max()
    vs_unfused = np.abs(np.asarray(y_folded) - m1_0_case["y_jax"]).max()
    print(f"m1_0 folded JAX vs torch fused: {vs_torch:.3g}; vs JAX unfused: {vs_unfused:.3g}")
    assert vs_torch < 8.5e-5 and vs_unfused < 6.2e-5    # 5x the measured 1.7e-5, 1.2e-5


# --- tiny variant -----------------------------------------------------------------------------

forward_tiny = jax.jit(RepViT(TINY).apply)
forward_tiny_train = jax.jit(functools.partial(RepViT(TINY).apply, train=True,
                                               mutable=["batch_stats"]))


def test_tiny_shapes_at_256_both_forms():
    variables = init_repvit(0, TINY)
    assert set(variables) == {"params", "batch_stats"}
    x = jax.random.uniform(jax.random.key(1), (2, 256, 256, 3))
    embedding, features = forward_tiny(variables, x)
    assert embedding.shape == (2, 64, 64, 64)
    assert features["stem"].shape == (2, 256, 256, 16)
    assert features["neck_in"].shape == (2, 64, 64, 96)
    assert np.isfinite(np.asarray(embedding)).all()

    deploy = _abstract_variables(TINY, deploy=True)
    assert set(deploy) == {"params"}
    embedding_shape, _ = jax.eval_shape(RepViT(TINY, deploy=True).apply, deploy, x)
    assert embedding_shape.shape == (2, 64, 64, 64)


def test_tiny_converted_matches_torch_eval():
    module = ref.build_reference(TINY.rows, TINY.stem_strides, TINY.neck_channels, seed=3)
    x = np.random.default_rng(3).random((2, 48, 48, 3), dtype=np.float32)
    y_jax, _ = forward_tiny(_convert(module, TINY), x)
    np.testing.assert_allclose(np.asarray(y_jax), _torch_forward_nhwc(module, x), atol=5e-5)


def test_tiny_train_mode_matches_torch_train_mode_and_updates_batch_stats():
    """Three training-mode forwards on different batches: outputs and running statistics follow
    PyTorch's (batch mean and *unbiased* batch variance folded in with momentum 0.1)."""
    module = ref.build_reference(TINY.rows, TINY.stem_strides, TINY.neck_channels, seed=5)
    variables = _convert(module, TINY)
    module.train()

    def flat(stats):
        return {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(stats)}

    ours_before = torch_before = flat(variables["batch_stats"])
    for step in range(3):
        x = np.random.default_rng([5, step]).random((2, 48, 48, 3), dtype=np.float32)
        (y_jax, _), updates = forward_tiny_train(variables, x)
        y_torch = _torch_forward_nhwc(module, x)      # also updates torch's running stats
        np.testing.assert_allclose(np.asarray(y_jax), y_torch, atol=1e-4)
        variables = {**variables, "batch_stats": updates["batch_stats"]}
        ours = flat(variables["batch_stats"])
        theirs = flat(_convert(module, TINY)["batch_stats"])
        assert ours.keys() == theirs.keys()
        for key, after in ours.items():
            assert not np.allclose(after, ours_before[key]), key
            np.testing.assert_allclose(after, theirs[key], rtol=1e-5, atol=1e-6, err_msg=key)
            # What this batch added (0.1 x its mean or unbiased variance): the biased variance
            # would be smaller by a factor (n - 1) / n, n = B*H*W <= 1152.
            np.testing.assert_allclose(after - 0.9 * ours_before[key],
                                       theirs[key] - 0.9 * torch_before[key],
                                       rtol=1e-5, atol=1e-7, err_msg=key)
        ours_before, torch_before = ours, theirs


# --- initialisation -------------------------------------------------------------------------

def _check_pytorch_like_init(variables: dict) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        name, keys = jax.tree_util.keystr(path), [p.key for p in path]
        if keys[-2] == "bn":
            zero = keys[-1] == "bias" or keys[-3] == "project"
            np.testing.assert_array_equal(leaf, 0.0 if zero else 1.0, err_msg=name)
        elif keys[-2].startswith("norm"):
            np.testing.assert_array_equal(leaf, 0.0 if keys[-1] == "bias" else 1.0)
        else:
            assert keys[-1] in ("kernel", "bias"), name     # random: bounds checked below
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["batch_stats"]):
        np.testing.assert_array_equal(leaf, 0.0 if path[-1].key == "mean" else 1.0)


MICRO = RepViTConfig("micro", (8, 16), ((3, 2, 16, 1, 0, 1), (3, 2, 24, 0, 0, 1)),
                     neck_channels=16)   # stem, an identity block with SE, a final transition
forward_micro = jax.jit(RepViT(MICRO).apply)


def _check_bounds(params: dict) -> None:
    for module_path, module in _modules_with_kernel(params):
        fan_in = int(np.prod(module["kernel"].shape[:-1]))
        bound = 1 / np.sqrt(fan_in)
        for leaf in module.values():
            assert np.abs(leaf).max() <= bound + 1e-7, module_path


def test_init_repvit_is_pytorch_like_and_transition_block_starts_at_zero():
    variables = init_repvit(jax.random.key(0), MICRO)
    _check_pytorch_like_init(variables)
    params = variables["params"]
    _check_bounds(params)
    wide = params["block_2"]["channel_mixer"]["expand"]["conv"]["kernel"]   # fan_in 16
    assert np.std(wide) == pytest.approx(0.25 / np.sqrt(3), rel=0.2)
    se_bias = params["block_1"]["se"]["fc1"]["bias"]                         # fan_in 16
    assert 0 < np.abs(se_bias).max() <= 0.25

    x = jax.random.uniform(jax.random.key(1), (1, 8, 8, 3))
    _, features = forward_micro(variables, x)
    assert np.abs(np.asarray(features["stage1"])).max() > 0
    # No residual and a zero-initialised last BN: the transition block outputs exactly zero.
    np.testing.assert_array_equal(np.asarray(features["neck_in"]), 0.0)


def test_module_initialisers_follow_the_same_rules():
    """What a larger model's ``.init`` gives this encoder's blocks (one block with RepVGGDW, SE
    and a channel mixer; the whole net's jitted init compiles for tens of seconds)."""
    block = RepViTBlock(block_specs(MICRO)[0])
    variables = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 16)))
    variables = {name: {"block_1": tree} for name, tree in variables.items()}
    _check_pytorch_like_init(variables)
    _check_bounds(variables["params"])
    fresh = init_repvit(0, MICRO)
    assert (jax.tree_util.tree_map(np.shape, variables["params"]["block_1"])
            == jax.tree_util.tree_map(np.shape, fresh["params"]["block_1"]))


def _modules_with_kernel(tree: dict, path: str = "") -> list[tuple[str, dict]]:
    found = [(path, tree)] if "kernel" in tree else []
    for name, value in tree.items():
        if isinstance(value, dict):
            found += _modules_with_kernel(value, f"{path}/{name}")
    return found


# --- converter strictness -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_state():
    module = ref.RepViT(TINY.rows, TINY.stem_strides, TINY.neck_channels)
    return ref.state_dict_numpy(module, PREFIX)


def _finish(state: dict) -> None:
    reader = StateDictReader(state)
    convert_repvit(reader, PREFIX, TINY)
    reader.finish()


def test_converter_consumes_every_key_of_a_matching_state_dict(tiny_state):
    _finish(tiny_state)                       # num_batches_tracked included: nothing left over


def test_converter_reports_missing_key(tiny_state):
    key = PREFIX + "features.7.channel_mixer.2.bn.running_var"
    state = {k: v for k, v in tiny_state.items() if k != key}
    with pytest.raises(CheckpointMismatchError) as err:
        _finish(state)
    assert err.value.missing == [key] and not err.value.unexpected


def test_converter_reports_unexpected_key(tiny_state):
    key = PREFIX + "features.7.channel_mixer.m.0.c.weight"   # transition has no Residual ".m."
    state = {**tiny_state, key: np.zeros((96, 64, 1, 1), np.float32)}
    with pytest.raises(CheckpointMismatchError) as err:
        _finish(state)
    assert err.value.unexpected == [key] and not err.value.missing


def test_converter_reports_wrong_shape(tiny_state):
    key = PREFIX + "features.1.token_mixer.1.fc1.weight"
    state = {**tiny_state, key: np.zeros((16, 16, 1, 1), np.float32)}
    with pytest.raises(CheckpointMismatchError) as err:
        _finish(state)
    assert err.value.mismatched == [(key, (8, 16, 1, 1), (16, 16, 1, 1))]
