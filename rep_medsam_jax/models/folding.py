"""BatchNorm folding (structural re-parameterisation) of the RepViT encoder: RepViT's ``fuse``
methods, as Rep-MedSAM's ``utils.replace_batchnorm`` applies them before inference.

Pure functions over arrays and variable trees. The arithmetic runs in float64 NumPy and rounds
to float32 once at the end, so the folded weights are as close to the exact fold as float32
allows (folding is an export step, never inside a jitted function).

Per output channel o, with BN weight g, bias b, running mean m, running variance v:
``s = g / sqrt(v + eps)``; a conv followed by that BN equals a conv with kernel ``W * s[o]`` and
bias ``b - m * s``. RepVGGDW additionally sums its three branches into one depthwise 3x3 kernel
before folding its outer BN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rep_medsam_jax.models.config import RepViTConfig
from rep_medsam_jax.models.repvit import RepViT

Tree = dict[str, Any]
BN_EPSILON = 1e-5


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _bn_scale_shift(bn_params: Mapping[str, Any], bn_stats: Mapping[str, Any],
                    eps: float) -> tuple[np.ndarray, np.ndarray]:
    """BN in inference mode as ``y * scale + shift``, float64, each (C,)."""
    scale = _f64(bn_params["scale"]) / np.sqrt(_f64(bn_stats["var"]) + eps)
    return scale, _f64(bn_params["bias"]) - _f64(bn_stats["mean"]) * scale


def _fold_conv_bn64(kernel: Any, bn_params: Mapping[str, Any], bn_stats: Mapping[str, Any],
                    eps: float) -> tuple[np.ndarray, np.ndarray]:
    scale, shift = _bn_scale_shift(bn_params, bn_stats, eps)
    return _f64(kernel) * scale, shift     # HWIO: the output channel is the last axis


def fold_conv_bn(kernel: Any, bn_params: Mapping[str, Any], bn_stats: Mapping[str, Any],
                 eps: float = BN_EPSILON) -> tuple[np.ndarray, np.ndarray]:
    """Conv (no bias) followed by BatchNorm -> one conv with bias.

    kernel: (kh, kw, C_in / groups, C_out) HWIO; bn_params: {"scale", "bias"} (C_out,);
    bn_stats: {"mean", "var"} (C_out,). Returns (kernel (kh, kw, C_in / groups, C_out),
    bias (C_out,)) in float32. Valid for any stride, padding and group count.
    """
    folded_kernel, bias = _fold_conv_bn64(kernel, bn_params, bn_stats, eps)
    return folded_kernel.astype(np.float32), bias.astype(np.float32)


def fold_repvgg_dw(dw3x3_kernel: Any, dw3x3_bn_params: Mapping[str, Any],
                   dw3x3_bn_stats: Mapping[str, Any], dw1x1_kernel: Any, dw1x1_bias: Any,
                   bn_params: Mapping[str, Any], bn_stats: Mapping[str, Any],
                   eps: float = BN_EPSILON) -> tuple[np.ndarray, np.ndarray]:
    """RepVGGDW ``bn(bn3(dw3x3(x)) + dw1x1(x) + x)`` -> one depthwise 3x3 conv with bias.

    dw3x3_kernel: (3, 3, 1, C); dw1x1_kernel: (1, 1, 1, C); dw1x1_bias, BN arrays: (C,).
    Returns (kernel (3, 3, 1, C), bias (C,)) float32. The 1x1 branch and the identity both
    become a value at the kernel centre (the 3x3 conv has padding 1, so the centre tap reads
    the same pixel as the 1x1 conv and the identity).
    """
    kernel, bias = _fold_conv_bn64(dw3x3_kernel, dw3x3_bn_params, dw3x3_bn_stats, eps)
    centre = kernel.shape[0] // 2, kernel.shape[1] // 2
    kernel[centre[0], centre[1], 0, :] += _f64(dw1x1_kernel).reshape(-1) + 1.0
    bias = bias + _f64(dw1x1_bias)
    scale, shift = _bn_scale_shift(bn_params, bn_stats, eps)
    return (kernel * scale).astype(np.float32), (bias * scale + shift).astype(np.float32)


def _fold_tree(params: Mapping[str, Any], stats: Mapping[str, Any] | None, path: str,
               eps: float) -> Tree:
    """Walk a training-form subtree, replacing every ConvBN and RepVGGDW by its folded conv."""
    stats = stats or {}
    keys = set(params)
    if keys == {"conv", "bn"} and "bn" in stats:                        # ConvBN
        kernel, bias = fold_conv_bn(params["conv"]["kernel"], params["bn"], stats["bn"], eps)
        _expect_consumed(stats, {"bn"}, path)
        return {"conv": {"kernel": kernel, "bias": bias}}
    if keys == {"dw3x3", "dw1x1", "bn"}:                                  # RepVGGDW
        inner = params["dw3x3"]
        kernel, bias = fold_repvgg_dw(inner["conv"]["kernel"], inner["bn"],
                                      stats["dw3x3"]["bn"], params["dw1x1"]["kernel"],
                                      params["dw1x1"]["bias"], params["bn"], stats["bn"], eps)
        _expect_consumed(stats, {"dw3x3", "bn"}, path)
        return {"conv": {"kernel": kernel, "bias": bias}}
    _expect_consumed(stats, keys, path)
    out: Tree = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            out[name] = _fold_tree(value, stats.get(name), f"{path}/{name}", eps)
        else:
            out[name] = np.asarray(value, dtype=np.float32)
    return out


def _expect_consumed(stats: Mapping[str, Any], used: set[str], path: str) -> None:
    leftover = set(stats) - used
    if leftover:
        raise ValueError(f"batch_stats at {path or '/'} not folded: {sorted(leftover)}")


def fold(variables: Mapping[str, Any], config: RepViTConfig,
         eps: float = BN_EPSILON) -> dict[str, Tree]:
    """Training-form RepViT variables ``{"params", "batch_stats"}`` -> deploy form ``{"params"}``.

    Exact in inference mode (running statistics). The result is checked against the parameter
    shapes of ``RepViT(config, deploy=True)``: a tree that does not fold into that network
    raises ``ValueError`` instead of failing later inside ``apply``.
    """
    folded = _fold_tree(variables["params"], variables.get("batch_stats"), "", eps)
    _check_deploy_shapes(folded, config)
    return {"params": folded}


def _check_deploy_shapes(folded: Tree, config: RepViTConfig) -> None:
    size = 2 * config.out_stride
    expected = jax.eval_shape(lambda: RepViT(config, deploy=True).init(
        jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))["params"]
    want = {k: tuple(v.shape) for k, v in _flatten(expected)}
    got = {k: tuple(v.shape) for k, v in _flatten(folded)}
    if want != got:
        diffs = [f"{k}: expected {want.get(k)}, got {got.get(k)}"
                 for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
        raise ValueError(f"folded variables do not match the deploy form of {config.name}:\n  "
                         + "\n  ".join(diffs[:20]))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for name, value in tree.items():
        if isinstance(value, Mapping):
            items.extend(_flatten(value, f"{prefix}{name}/"))
        else:
            items.append((prefix + name, value))
    return items
