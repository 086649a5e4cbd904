"""BN folding (RepViT's replace_batchnorm): each foldable unit against direct unfolded evaluation in PyTorch, hand
values, and the whole tiny encoder folded against the PyTorch reference's replace_batchnorm."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

from rep_medsam_jax.convert.repvit import convert_repvit
from rep_medsam_jax.convert.state_dict import StateDictReader
from rep_medsam_jax.models.config import REPVIT_VARIANTS
from rep_medsam_jax.models.folding import fold, fold_conv_bn, fold_repvgg_dw
from rep_medsam_jax.models.repvit import ConvBN, RepVGGDW, RepViT, count_params
from tests.reference import repvit_torch as ref

TINY = REPVIT_VARIANTS["rep_medsam_tiny"]
SEEDS = (0, 1, 2)

# Jitted once per module: whole-network calls below share these compilations (one input shape).
forward = jax.jit(RepViT(TINY).apply)
forward_deploy = jax.jit(RepViT(TINY, deploy=True).apply)
forward_train = jax.jit(functools.partial(RepViT(TINY).apply, train=True,
                                          mutable=["batch_stats"]))
TINY_INPUT_SHAPE = (2, 48, 48, 3)


def _random_bn(rng: np.random.Generator, channels: int) -> tuple[dict, dict]:
    """Flax-layout BN params/stats far from identity, so that a wrong fold cannot pass."""
    params = {"scale": rng.uniform(0.3, 2.0, channels), "bias": rng.normal(0, 0.5, channels)}
    stats = {"mean": rng.normal(0, 0.5, channels), "var": rng.uniform(0.2, 3.0, channels)}
    return ({k: v.astype(np.float32) for k, v in params.items()},
            {k: v.astype(np.float32) for k, v in stats.items()})


def _load_bn(bn: torch.nn.BatchNorm2d, params: dict, stats: dict) -> None:
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(params["scale"]))
        bn.bias.copy_(torch.from_numpy(params["bias"]))
        bn.running_mean.copy_(torch.from_numpy(stats["mean"]))
        bn.running_var.copy_(torch.from_numpy(stats["var"]))


def _torch_nhwc(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        y = module.eval()(torch.from_numpy(x).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).numpy()


# (in, out, kernel, stride, pad, groups, input size): full 3x3, strided depthwise on even and
# odd inputs (RepViT's padding quirk), pointwise, a 5x5 strided depthwise.
CONV_BN_CASES = [
    (5, 7, 3, 1, 1, 1, 9),
    (6, 6, 3, 2, 1, 6, 10),
    (6, 6, 3, 2, 1, 6, 9),
    (8, 12, 1, 1, 0, 1, 6),
    (4, 4, 5, 2, 2, 4, 11),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cin,cout,k,stride,pad,groups,size", CONV_BN_CASES)
def test_fold_conv_bn_matches_unfolded_torch(seed, cin, cout, k, stride, pad, groups, size):
    rng = np.random.default_rng(seed)
    torch_unit = ref.Conv2d_BN(cin, cout, k, stride, pad, groups=groups)
    weight = rng.normal(0, 0.5, (cout, cin // groups, k, k)).astype(np.float32)
    bn_params, bn_stats = _random_bn(rng, cout)
    with torch.no_grad():
        torch_unit.c.weight.copy_(torch.from_numpy(weight))
    _load_bn(torch_unit.bn, bn_params, bn_stats)
    x = rng.normal(0, 1, (2, size, size, cin)).astype(np.float32)

    kernel, bias = fold_conv_bn(weight.transpose(2, 3, 1, 0), bn_params, bn_stats)
    assert kernel.dtype == np.float32 and bias.dtype == np.float32
    deploy = ConvBN(cout, k, stride, pad, groups=groups, deploy=True)
    y_folded = deploy.apply({"params": {"conv": {"kernel": kernel, "bias": bias}}}, x)

    y_unfolded = _torch_nhwc(torch_unit, x)
    assert y_folded.shape == y_unfolded.shape
    np.testing.assert_allclose(y_folded, y_unfolded, atol=2e-5, rtol=1e-5)

    # Same numbers as the reference's own Conv2d_BN.fuse (OIHW -> HWIO).
    fused = torch_unit.fuse()
    np.testing.assert_allclose(kernel, fused.weight.detach().numpy().transpose(2, 3, 1, 0),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bias, fused.bias.detach().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("channels,size", [(6, 8), (5, 7)])
def test_fold_repvgg_dw_matches_unfolded_torch(seed, channels, size):
    rng = np.random.default_rng(100 + seed)
    torch_unit = ref.RepVGGDW(channels)
    w3 = rng.normal(0, 0.5, (channels, 1, 3, 3)).astype(np.float32)
    w1 = rng.normal(0, 0.5, (channels, 1, 1, 1)).astype(np.float32)
    b1 = rng.normal(0, 0.5, channels).astype(np.float32)
    inner_params, inner_stats = _random_bn(rng, channels)
    outer_params, outer_stats = _random_bn(rng, channels)
    with torch.no_grad():
        torch_unit.conv.c.weight.copy_(torch.from_numpy(w3))
        torch_unit.conv1.weight.copy_(torch.from_numpy(w1))
        torch_unit.conv1.bias.copy_(torch.from_numpy(b1))
    _load_bn(torch_unit.conv.bn, inner_params, inner_stats)
    _load_bn(torch_unit.bn, outer_params, outer_stats)
    x = rng.normal(0, 1, (2, size, size, channels)).astype(np.float32)

    kernel, bias = fold_repvgg_dw(w3.transpose(2, 3, 1, 0), inner_params, inner_stats,
                                  w1.transpose(2, 3, 1, 0), b1, outer_params, outer_stats)
    assert kernel.shape == (3, 3, 1, channels) and bias.shape == (channels,)
    y_folded = RepVGGDW(deploy=True).apply(
        {"params": {"conv": {"kernel": kernel, "bias": bias}}}, x)
    np.testing.assert_allclose(y_folded, _torch_nhwc(torch_unit, x), atol=2e-5, rtol=1e-5)

    # And the JAX training form evaluated unfolded on the same weights.
    unfolded = {
        "params": {"dw3x3": {"conv": {"kernel": w3.transpose(2, 3, 1, 0)}, "bn": inner_params},
                   "dw1x1": {"kernel": w1.transpose(2, 3, 1, 0), "bias": b1},
                   "bn": outer_params},
        "batch_stats": {"dw3x3": {"bn": inner_stats}, "bn": outer_stats},
    }
    np.testing.assert_allclose(y_folded, RepVGGDW().apply(unfolded, x), atol=2e-5, rtol=1e-5)


def test_fold_conv_bn_hand_values():
    # s = 3 / sqrt(4) = 1.5: kernel 2 -> 3, bias 1 - 0.5 * 1.5 = 0.25.
    kernel, bias = fold_conv_bn(np.full((1, 1, 1, 1), 2.0), {"scale": [3.0], "bias": [1.0]},
                                {"mean": [0.5], "var": [4.0]}, eps=0.0)
    np.testing.assert_array_equal(kernel, np.full((1, 1, 1, 1), 3.0, np.float32))
    np.testing.assert_array_equal(bias, np.array([0.25], np.float32))


def test_fold_repvgg_dw_hand_values():
    # Inner BN (s=1, shift 0.5) on a zero 3x3 kernel; 1x1 weight 2, bias 0.25; identity 1:
    # centre 0 + 2 + 1 = 3, bias 0.5 + 0.25 = 0.75. Outer BN s = 2 / sqrt(4) = 1, shift
    # 0.1 - 0.25: kernel centre 3, bias 0.75 * 1 + 0.1 - 0.25 = 0.6. Off-centre taps stay 0.
    ones = {"scale": [1.0], "bias": [0.5]}, {"mean": [0.0], "var": [1.0]}
    outer = {"scale": [2.0], "bias": [0.1]}, {"mean": [0.25], "var": [4.0]}
    kernel, bias = fold_repvgg_dw(np.zeros((3, 3, 1, 1)), *ones, np.full((1, 1, 1, 1), 2.0),
                                  [0.25], *outer, eps=0.0)
    expected = np.zeros((3, 3, 1, 1), np.float32)
    expected[1, 1, 0, 0] = 3.0
    np.testing.assert_array_equal(kernel, expected)
    np.testing.assert_allclose(bias, [0.6], rtol=1e-7)


def _converted_tiny(seed: int) -> tuple[torch.nn.Module, dict]:
    module = ref.build_reference(TINY.rows, TINY.stem_strides, TINY.neck_channels, seed=seed)
    reader = StateDictReader(ref.state_dict_numpy(module, "image_encoder."))
    variables = convert_repvit(reader, "image_encoder.", TINY)
    reader.finish()
    return module, variables


@pytest.mark.parametrize("seed", (0, 1))
def test_fold_whole_tiny_encoder_matches_torch_replace_batchnorm(seed):
    module, variables = _converted_tiny(seed)
    folded = fold(variables, TINY)
    assert set(folded) == {"params"}

    x = np.random.default_rng(seed).random(TINY_INPUT_SHAPE, dtype=np.float32)
    y_unfused, _ = forward(variables, x)
    y_folded, features = forward_deploy(folded, x)
    ref.replace_batchnorm(module)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    y_torch_fused = _torch_nhwc(module, x)

    assert np.abs(y_folded).max() > 0.5          # a non-trivial output
    np.testing.assert_allclose(y_folded, y_unfused, atol=2e-5)
    np.testing.assert_allclose(y_folded, y_torch_fused, atol=2e-5)
    assert count_params(folded) == ref.parameter_count(module)
    assert features["neck_in"].shape == (2, 12, 12, 96)


def test_fold_is_pure_and_float32():
    _, variables = _converted_tiny(0)
    before = jax.tree_util.tree_map(np.copy, variables)
    folded = fold(variables, TINY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(folded)} == {np.dtype(np.float32)}


def test_fold_rejects_trees_that_do_not_fold_into_the_config():
    _, variables = _converted_tiny(0)
    with pytest.raises(ValueError, match="deploy form"):
        fold(variables, REPVIT_VARIANTS["rep_medsam_m0_9"])

    # A BN whose statistics would be silently dropped is an error, not a quiet mis-fold.
    extra = jax.tree_util.tree_map(lambda a: a, variables)
    extra["batch_stats"]["neck"] = {"stray_bn": {"mean": np.zeros(3), "var": np.ones(3)}}
    with pytest.raises(ValueError, match="not folded"):
        fold(extra, TINY)


def test_fold_is_exact_only_with_running_statistics():
    """Folding quirk: the folded net reproduces inference mode, not train-mode BN."""
    _, variables = _converted_tiny(0)
    x = np.random.default_rng(3).random(TINY_INPUT_SHAPE, dtype=np.float32)
    y_folded, _ = forward_deploy(fold(variables, TINY), x)
    (y_train, _), _ = forward_train(variables, x)
    assert np.abs(np.asarray(y_folded) - np.asarray(y_train)).max() > 1e-2
