"""Rep-MedSAM RepViT encoder: PyTorch state dict (unfused, as the authors'
code loads it) -> Flax training form.

The checkpoint numbers modules as ``features.N`` (N = 0 for the stem, then one per config row)
and ``neck.0..3``. Residual channel mixers live under ``channel_mixer.m.``; the stride-1
width-changing (transition) block's mixer has no Residual wrapper, so its keys are
``channel_mixer.0/2``. SE weights are ``token_mixer.1.fc1/fc2``; a downsample block's depthwise
and projection convs are ``token_mixer.0`` and ``token_mixer.2``.

The result feeds ``RepViT(config, deploy=False).apply``; fold it with
``rep_medsam_jax.models.folding.fold`` for the deploy form.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from rep_medsam_jax.convert.state_dict import StateDictReader, conv_kernel, linear_kernel
from rep_medsam_jax.models.config import REPVIT_VARIANTS, RepViTConfig
from rep_medsam_jax.models.repvit import BlockSpec, block_specs, se_reduced_channels

Tree = dict[str, Any]


def _batchnorm(reader: StateDictReader, key: str, channels: int) -> tuple[Tree, Tree]:
    """BatchNorm2d at ``key`` -> (params {scale, bias}, batch_stats {mean, var})."""
    params = {"scale": reader.take(key + "weight", (channels,)),
              "bias": reader.take(key + "bias", (channels,))}
    stats = {"mean": reader.take(key + "running_mean", (channels,)),
             "var": reader.take(key + "running_var", (channels,))}
    reader.skip(key + "num_batches_tracked")
    return params, stats


def _conv_bn(reader: StateDictReader, key: str, out_ch: int, in_per_group: int,
             kernel: int) -> tuple[Tree, Tree]:
    """Conv2d_BN at ``key`` (children ``c``, ``bn``) -> the ``ConvBN`` module's two subtrees."""
    weight = reader.take(key + "c.weight", (out_ch, in_per_group, kernel, kernel))
    bn_params, bn_stats = _batchnorm(reader, key + "bn.", out_ch)
    return {"conv": {"kernel": conv_kernel(weight)}, "bn": bn_params}, {"bn": bn_stats}


def _repvgg_dw(reader: StateDictReader, key: str, channels: int) -> tuple[Tree, Tree]:
    """RepVGGDW at ``key`` (children ``conv`` = Conv2d_BN, ``conv1``, ``bn``)."""
    dw3_params, dw3_stats = _conv_bn(reader, key + "conv.", channels, 1, 3)
    dw1_weight = reader.take(key + "conv1.weight", (channels, 1, 1, 1))
    dw1_bias = reader.take(key + "conv1.bias", (channels,))
    bn_params, bn_stats = _batchnorm(reader, key + "bn.", channels)
    params = {"dw3x3": dw3_params,
              "dw1x1": {"kernel": conv_kernel(dw1_weight), "bias": dw1_bias},
              "bn": bn_params}
    return params, {"dw3x3": dw3_stats, "bn": bn_stats}


def _squeeze_excite(reader: StateDictReader, key: str, channels: int) -> Tree:
    """timm SEModule 1x1 convs (r, C, 1, 1) / (C, r, 1, 1) -> Dense kernels (C, r) / (r, C)."""
    reduced = se_reduced_channels(channels)
    fc1 = reader.take(key + "fc1.weight", (reduced, channels, 1, 1))
    fc2 = reader.take(key + "fc2.weight", (channels, reduced, 1, 1))
    return {"fc1": {"kernel": linear_kernel(fc1[:, :, 0, 0]),
                    "bias": reader.take(key + "fc1.bias", (reduced,))},
            "fc2": {"kernel": linear_kernel(fc2[:, :, 0, 0]),
                    "bias": reader.take(key + "fc2.bias", (channels,))}}


def _block(reader: StateDictReader, key: str, spec: BlockSpec) -> tuple[Tree, Tree]:
    """One RepViTBlock at ``key`` = ``...features.N.``."""
    params: Tree = {}
    stats: Tree = {}
    cin, cout = spec.in_channels, spec.out_channels
    if spec.kind == "downsample":
        params["token_mixer"], stats["token_mixer"] = _conv_bn(
            reader, key + "token_mixer.0.", cin, 1, spec.kernel_size)
        if spec.use_se:
            params["se"] = _squeeze_excite(reader, key + "token_mixer.1.", cin)
        params["projection"], stats["projection"] = _conv_bn(
            reader, key + "token_mixer.2.", cout, cin, 1)
        mixer_in = cout
    else:
        params["token_mixer"], stats["token_mixer"] = _repvgg_dw(
            reader, key + "token_mixer.0.", cin)
        if spec.use_se:
            params["se"] = _squeeze_excite(reader, key + "token_mixer.1.", cin)
        mixer_in = cin
    # Residual(Sequential) adds ".m." to the path; the transition block's mixer is bare.
    mixer_key = key + ("channel_mixer." if spec.kind == "transition" else "channel_mixer.m.")
    expand_p, expand_s = _conv_bn(reader, mixer_key + "0.", spec.hidden_channels, mixer_in, 1)
    project_p, project_s = _conv_bn(reader, mixer_key + "2.", cout, spec.hidden_channels, 1)
    params["channel_mixer"] = {"expand": expand_p, "project": project_p}
    stats["channel_mixer"] = {"expand": expand_s, "project": project_s}
    return params, stats


def convert_repvit(reader: StateDictReader, prefix: str = "image_encoder.",
                   config: RepViTConfig | None = None) -> dict[str, Tree]:
    """Unfused Rep-MedSAM encoder keys under ``prefix`` -> ``{"params", "batch_stats"}``.

    ``config`` defaults to ``rep_medsam_m1_0`` (706 keys). Every expected key is ``take``-n with
    its PyTorch shape and ``num_batches_tracked`` is skipped; the caller runs ``reader.finish()``
    to report missing, unexpected or mis-shaped keys. Arrays are float32 NumPy.
    """
    config = config or REPVIT_VARIANTS["rep_medsam_m1_0"]
    hidden, stem_out = config.stem_channels
    params: Tree = {"stem": {}}
    stats: Tree = {"stem": {}}
    stem_key = prefix + "features.0."
    params["stem"]["conv_bn1"], stats["stem"]["conv_bn1"] = _conv_bn(
        reader, stem_key + "0.", hidden, 3, 3)
    params["stem"]["conv_bn2"], stats["stem"]["conv_bn2"] = _conv_bn(
        reader, stem_key + "2.", stem_out, hidden, 3)

    specs = block_specs(config)
    for spec in specs:
        name = f"block_{spec.index}"
        params[name], stats[name] = _block(reader, f"{prefix}features.{spec.index}.", spec)

    last = specs[-1].out_channels if specs else stem_out
    neck, key = config.neck_channels, prefix + "neck."
    params["neck"] = {
        "conv1": {"kernel": conv_kernel(reader.take(key + "0.weight", (neck, last, 1, 1)))},
        "norm1": {"weight": reader.take(key + "1.weight", (neck,)),
                  "bias": reader.take(key + "1.bias", (neck,))},
        "conv2": {"kernel": conv_kernel(reader.take(key + "2.weight", (neck, neck, 3, 3)))},
        "norm2": {"weight": reader.take(key + "3.weight", (neck,)),
                  "bias": reader.take(key + "3.bias", (neck,))},
    }
    # Transposes return views; hand out contiguous arrays so later device puts are plain copies.
    return jax.tree_util.tree_map(np.ascontiguousarray, {"params": params, "batch_stats": stats})
