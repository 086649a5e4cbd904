"""SAM / MedSAM ViT image-encoder state dict -> ViTImageEncoder variables.

Key layout (prefix ``image_encoder.`` in a full SAM checkpoint, none in Rep-MedSAM's
``MedSAM_Enc.pth``): ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.{norm1, attn.qkv,
attn.proj, attn.rel_pos_h, attn.rel_pos_w, norm2, mlp.lin1, mlp.lin2}.*`` and
``neck.{0,1,2,3}.*`` (177 keys for ViT-B).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rep_medsam_jax.convert.state_dict import StateDictReader, conv_kernel, linear_kernel
from rep_medsam_jax.models.config import VIT_VARIANTS, ViTConfig


def _linear(reader: StateDictReader, key: str, in_dim: int, out_dim: int,
            bias: bool = True) -> dict[str, np.ndarray]:
    params = {"kernel": linear_kernel(reader.take(f"{key}.weight", (out_dim, in_dim)))}
    if bias:
        params["bias"] = reader.take(f"{key}.bias", (out_dim,))
    return params


def _layernorm(reader: StateDictReader, key: str, dim: int) -> dict[str, np.ndarray]:
    # flax.linen.LayerNorm calls the weight "scale".
    return {"scale": reader.take(f"{key}.weight", (dim,)), "bias": reader.take(f"{key}.bias", (dim,))}


def _block(reader: StateDictReader, key: str, config: ViTConfig, index: int) -> dict[str, Any]:
    dim = config.embed_dim
    head_dim = dim // config.num_heads
    mlp_dim = int(dim * config.mlp_ratio)
    attn = {
        "qkv": _linear(reader, f"{key}.attn.qkv", dim, 3 * dim, bias=config.qkv_bias),
        "proj": _linear(reader, f"{key}.attn.proj", dim, dim),
    }
    if config.use_rel_pos:
        windowed = config.window_size > 0 and index not in config.global_attn_indexes
        size = config.window_size if windowed else config.grid_size
        attn["rel_pos_h"] = reader.take(f"{key}.attn.rel_pos_h", (2 * size - 1, head_dim))
        attn["rel_pos_w"] = reader.take(f"{key}.attn.rel_pos_w", (2 * size - 1, head_dim))
    return {
        "norm1": _layernorm(reader, f"{key}.norm1", dim),
        "attn": attn,
        "norm2": _layernorm(reader, f"{key}.norm2", dim),
        "mlp": {"lin1": _linear(reader, f"{key}.mlp.lin1", dim, mlp_dim),
                "lin2": _linear(reader, f"{key}.mlp.lin2", mlp_dim, dim)},
    }


def convert_vit(reader: StateDictReader, prefix: str = "image_encoder.",
                config: ViTConfig = VIT_VARIANTS["medsam_vit_b"]) -> dict[str, Any]:
    """Read a SAM ImageEncoderViT state dict into ``{"params": ...}`` for ``ViTImageEncoder``.

    Takes every key the configuration implies (with its PyTorch shape); missing, extra and
    mis-shaped keys are reported by the caller's ``reader.finish()``.
    """
    dim, out, patch = config.embed_dim, config.out_chans, config.patch_size
    params: dict[str, Any] = {
        "patch_embed": {
            "kernel": conv_kernel(reader.take(f"{prefix}patch_embed.proj.weight",
                                              (dim, 3, patch, patch))),
            "bias": reader.take(f"{prefix}patch_embed.proj.bias", (dim,)),
        },
    }
    if config.use_abs_pos:
        # Already channels-last in SAM: (1, grid, grid, dim).
        params["pos_embed"] = reader.take(f"{prefix}pos_embed",
                                          (1, config.grid_size, config.grid_size, dim))
    for i in range(config.depth):
        params[f"blocks_{i}"] = _block(reader, f"{prefix}blocks.{i}", config, i)
    params["neck"] = {
        "conv1": {"kernel": conv_kernel(reader.take(f"{prefix}neck.0.weight", (out, dim, 1, 1)))},
        "norm1": {"weight": reader.take(f"{prefix}neck.1.weight", (out,)),
                  "bias": reader.take(f"{prefix}neck.1.bias", (out,))},
        "conv2": {"kernel": conv_kernel(reader.take(f"{prefix}neck.2.weight", (out, out, 3, 3)))},
        "norm2": {"weight": reader.take(f"{prefix}neck.3.weight", (out,)),
                  "bias": reader.take(f"{prefix}neck.3.bias", (out,))},
    }
    return {"params": params}
