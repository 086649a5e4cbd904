"""PyTorch SAM prompt encoder / mask decoder state dicts -> Flax params.

The key layout is SAM's (shared by Rep-MedSAM, LiteMedSAM and MedSAM): 17 prompt-encoder keys
and, for the reference configuration, 120 mask-decoder keys. Every expected key is taken with
its PyTorch shape, so a missing, extra or mis-shaped tensor shows up in ``reader.finish()``.
"""

from __future__ import annotations

import numpy as np

from rep_medsam_jax.convert.state_dict import StateDictReader, conv_kernel, linear_kernel
from rep_medsam_jax.models.config import DecoderConfig

Params = dict[str, object]


def _linear(reader: StateDictReader, key: str, in_dim: int, out_dim: int) -> Params:
    return {"kernel": linear_kernel(reader.take(f"{key}.weight", (out_dim, in_dim))),
            "bias": reader.take(f"{key}.bias", (out_dim,))}


def _layer_norm(reader: StateDictReader, key: str, dim: int) -> Params:
    """nn.LayerNorm -> flax LayerNorm (``weight`` is Flax's ``scale``)."""
    return {"scale": reader.take(f"{key}.weight", (dim,)),
            "bias": reader.take(f"{key}.bias", (dim,))}


def _layer_norm_2d(reader: StateDictReader, key: str, dim: int) -> Params:
    """SAM's LayerNorm2d -> layers.LayerNorm2d (same names)."""
    return {"weight": reader.take(f"{key}.weight", (dim,)),
            "bias": reader.take(f"{key}.bias", (dim,))}


def _conv(reader: StateDictReader, key: str, in_ch: int, out_ch: int, k: int) -> Params:
    return {"kernel": conv_kernel(reader.take(f"{key}.weight", (out_ch, in_ch, k, k))),
            "bias": reader.take(f"{key}.bias", (out_ch,))}


def _conv_transpose_2x2(reader: StateDictReader, key: str, in_ch: int, out_ch: int) -> Params:
    """ConvTranspose2d weight (Cin, Cout, kh, kw) -> ConvTranspose2x2 kernel (kh, kw, Cin, Cout)."""
    weight = reader.take(f"{key}.weight", (in_ch, out_ch, 2, 2))
    return {"kernel": np.transpose(weight, (2, 3, 0, 1)),
            "bias": reader.take(f"{key}.bias", (out_ch,))}


def _embedding(reader: StateDictReader, key: str, rows: int, dim: int) -> np.ndarray:
    return reader.take(f"{key}.weight", (rows, dim))


def _mlp(reader: StateDictReader, key: str, dims: list[int]) -> Params:
    """SAM's MLP (``layers.i``) with widths dims[0] -> dims[1] -> ... -> dims[-1]."""
    return {f"layers_{i}": _linear(reader, f"{key}.layers.{i}", dims[i], dims[i + 1])
            for i in range(len(dims) - 1)}


def _attention(reader: StateDictReader, key: str, dim: int, downsample_rate: int) -> Params:
    internal = dim // downsample_rate
    params = {name: _linear(reader, f"{key}.{name}", dim, internal)
              for name in ("q_proj", "k_proj", "v_proj")}
    params["out_proj"] = _linear(reader, f"{key}.out_proj", internal, dim)
    return params


def convert_prompt_encoder(reader: StateDictReader, prefix: str = "prompt_encoder.",
                           embed_dim: int = 256, mask_in_chans: int = 16) -> dict:
    """SAM ``PromptEncoder`` keys under ``prefix`` -> ``{"params": ...}`` for PromptEncoder.

    The positional-encoding Gaussian matrix (a buffer in PyTorch) is copied as is: it must come
    from the checkpoint, never be regenerated.
    """
    p = prefix
    params: Params = {
        "pe_layer": {"positional_encoding_gaussian_matrix": reader.take(
            f"{p}pe_layer.positional_encoding_gaussian_matrix", (2, embed_dim // 2))},
        "not_a_point_embed": _embedding(reader, f"{p}not_a_point_embed", 1, embed_dim),
        "no_mask_embed": _embedding(reader, f"{p}no_mask_embed", 1, embed_dim),
    }
    for i in range(4):
        params[f"point_embeddings_{i}"] = _embedding(reader, f"{p}point_embeddings.{i}", 1,
                                                     embed_dim)
    hidden = mask_in_chans // 4
    params["mask_downscaling"] = {
        "conv_0": _conv(reader, f"{p}mask_downscaling.0", 1, hidden, 2),
        "norm_1": _layer_norm_2d(reader, f"{p}mask_downscaling.1", hidden),
        "conv_3": _conv(reader, f"{p}mask_downscaling.3", hidden, mask_in_chans, 2),
        "norm_4": _layer_norm_2d(reader, f"{p}mask_downscaling.4", mask_in_chans),
        "conv_6": _conv(reader, f"{p}mask_downscaling.6", mask_in_chans, embed_dim, 1),
    }
    return {"params": params}


def _two_way_transformer(reader: StateDictReader, key: str, config: DecoderConfig,
                         downsample_rate: int = 2) -> Params:
    dim = config.embed_dim
    params: Params = {}
    for i in range(config.depth):
        layer = f"{key}.layers.{i}"
        params[f"layers_{i}"] = {
            "self_attn": _attention(reader, f"{layer}.self_attn", dim, 1),
            "cross_attn_token_to_image": _attention(
                reader, f"{layer}.cross_attn_token_to_image", dim, downsample_rate),
            "cross_attn_image_to_token": _attention(
                reader, f"{layer}.cross_attn_image_to_token", dim, downsample_rate),
            "mlp": {"lin1": _linear(reader, f"{layer}.mlp.lin1", dim, config.mlp_dim),
                    "lin2": _linear(reader, f"{layer}.mlp.lin2", config.mlp_dim, dim)},
            **{f"norm{n}": _layer_norm(reader, f"{layer}.norm{n}", dim) for n in range(1, 5)},
        }
    params["final_attn_token_to_image"] = _attention(
        reader, f"{key}.final_attn_token_to_image", dim, downsample_rate)
    params["norm_final_attn"] = _layer_norm(reader, f"{key}.norm_final_attn", dim)
    return params


def convert_mask_decoder(reader: StateDictReader, prefix: str = "mask_decoder.",
                         config: DecoderConfig = DecoderConfig()) -> dict:
    """SAM ``MaskDecoder(TwoWayTransformer)`` keys under ``prefix`` -> ``{"params": ...}``."""
    p = prefix
    dim = config.embed_dim
    num_mask_tokens = config.num_multimask_outputs + 1
    params: Params = {
        "iou_token": _embedding(reader, f"{p}iou_token", 1, dim),
        "mask_tokens": _embedding(reader, f"{p}mask_tokens", num_mask_tokens, dim),
        "transformer": _two_way_transformer(reader, f"{p}transformer", config),
        "output_upscaling": {
            "conv_transpose_0": _conv_transpose_2x2(reader, f"{p}output_upscaling.0",
                                                    dim, dim // 4),
            "norm_1": _layer_norm_2d(reader, f"{p}output_upscaling.1", dim // 4),
            "conv_transpose_3": _conv_transpose_2x2(reader, f"{p}output_upscaling.3",
                                                    dim // 4, dim // 8),
        },
        "iou_prediction_head": _mlp(
            reader, f"{p}iou_prediction_head",
            [dim] + [config.iou_head_hidden_dim] * (config.iou_head_depth - 1)
            + [num_mask_tokens]),
    }
    for t in range(num_mask_tokens):
        params[f"output_hypernetworks_mlps_{t}"] = _mlp(
            reader, f"{p}output_hypernetworks_mlps.{t}", [dim, dim, dim, dim // 8])
    return {"params": params}
