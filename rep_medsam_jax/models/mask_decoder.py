"""SAM's mask decoder (segment-anything ``mask_decoder.py``), NHWC inside, masks returned
(N, M, 4h, 4w) as in SAM.

One image embedding (batch 1) can serve N prompts: it is never copied per prompt by hand; the
image side broadcasts until the transformer's first image->token update makes it per prompt.
The k=2, s=2 transposed convolutions are written as one matrix product + reshape (no overlap
between output pixels), and the hypernetwork-times-features product as a batched matrix
product: they export to ONNX Gemm and MatMul. (Written as einsums they exported as Einsum nodes,
which onnxruntime ran slowly: 24-35 % of the decoder's CPU time; as MatMul the decoder took
0.63x the time for one box and 0.86x for six, same outputs to 3e-7.)

Everything after the transformer acts on each pixel alone (the transposed convolutions map one
input pixel to its own 2x2 output pixels; LayerNorm2d, GELU and the hypernetwork product are
per pixel), so the upscaling stays in "sub-pixel" order, (N, h, w, 2, 2, 2, 2, C/8), and only
the final (N, M, ...) masks are interleaved into (4h, 4w): one small transpose instead of two
transposes of the 4x and 16x upscaled feature maps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rep_medsam_jax.models.config import DecoderConfig
from rep_medsam_jax.models.layers import LayerNorm2d, gelu
from rep_medsam_jax.models.transformer import TwoWayTransformer, linear

# PyTorch's nn.Embedding initialises with N(0, 1).
_embedding_init = nn.initializers.normal(stddev=1.0)


class ConvTranspose2x2(nn.Module):
    """ConvTranspose2d(kernel 2, stride 2): (B, h, w, Cin) -> (B, 2h, 2w, Cout).

    out[b, 2i+a, 2j+s, o] = bias[o] + Σ_c x[b, i, j, c] · kernel[a, s, c, o]. The kernel is
    PyTorch's (Cin, Cout, kh, kw) weight transposed to (kh, kw, Cin, Cout).
    With ``interleave=False`` the output stays in sub-pixel order: (..., Cin) -> (..., 2, 2,
    Cout), where [..., a, s, :] is output pixel (2i+a, 2j+s) of input pixel (..., i, j, :).
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, interleave: bool = True) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (2, 2, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        channels = x.shape[-1]
        # (c, a*s*o): one matrix product gives every input pixel's four output pixels.
        flat_kernel = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(channels, 4 * self.features)
        # One Gemm in ONNX, bias included (``linear``); 2-D, as jax2onnx writes (B, h, w, c) @
        # (c, n) as an Einsum node.
        y = linear(x.reshape(-1, channels), flat_kernel, jnp.tile(bias, 4))
        y = y.reshape(*x.shape[:-1], 2, 2, self.features)
        if not interleave:
            return y
        batch, height, width, _ = x.shape
        # Axes (b, i, a, j, s, o) flatten row-major to rows 2i+a and columns 2j+s.
        y = jnp.transpose(y, (0, 1, 3, 2, 4, 5))
        return y.reshape(batch, 2 * height, 2 * width, self.features)


def interleave_subpixels(x: jax.Array) -> jax.Array:
    """Two nested 2x2 upscalings in sub-pixel order -> image order.

    x (B, h, w, 2, 2, 2, 2, ...): [b, i, j, a, s, a2, s2] is pixel (4i + 2a + a2, 4j + 2s + s2)
    -> (B, ..., 4h, 4w) (trailing axes move before the image axes).
    """
    batch, height, width = x.shape[:3]
    rest = x.shape[7:]
    trailing = tuple(range(7, x.ndim))
    # (b, rest, i, a, a2, j, s, s2) flattens row-major to rows 4i+2a+a2, columns 4j+2s+s2.
    x = jnp.transpose(x, (0, *trailing, 1, 3, 5, 2, 4, 6))
    return x.reshape(batch, *rest, 4 * height, 4 * width)


class OutputUpscaling(nn.Module):
    """(B, h, w, C) -> (B, 4h, 4w, C/8): ConvT, LayerNorm2d, GELU, ConvT, GELU.

    Children are named after the PyTorch ``nn.Sequential`` indexes (2 and 4 are the GELUs).
    With ``interleave=False`` the output is in sub-pixel order, (B, h, w, 2, 2, 2, 2, C/8)
    (see ``interleave_subpixels``): every step is per pixel, so the order does not matter.
    """

    transformer_dim: int = 256

    @nn.compact
    def __call__(self, x: jax.Array, interleave: bool = True) -> jax.Array:
        x = ConvTranspose2x2(self.transformer_dim // 4, name="conv_transpose_0")(
            x, interleave=False)
        x = gelu(LayerNorm2d(name="norm_1")(x))
        x = gelu(ConvTranspose2x2(self.transformer_dim // 8, name="conv_transpose_3")(
            x, interleave=False))
        if not interleave:
            return x
        # The channel axis rides along as a trailing axis, then goes back last.
        return jnp.moveaxis(interleave_subpixels(x), 1, -1)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last, no sigmoid)."""

    hidden_dim: int
    output_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.output_dim if last else self.hidden_dim, name=f"layers_{i}")(x)
            if not last:
                x = jax.nn.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Image embedding + prompt embeddings -> mask logits (N, M, 4h, 4w) and IoU (N, M).

    M = ``num_multimask_outputs`` (SAM's masks 1:) with ``multimask_output``, else 1 (mask 0).
    """

    transformer_dim: int = 256
    num_multimask_outputs: int = 3
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @classmethod
    def from_config(cls, config: DecoderConfig) -> "MaskDecoder":
        return cls(transformer_dim=config.embed_dim,
                   num_multimask_outputs=config.num_multimask_outputs,
                   depth=config.depth, num_heads=config.num_heads, mlp_dim=config.mlp_dim,
                   iou_head_depth=config.iou_head_depth,
                   iou_head_hidden_dim=config.iou_head_hidden_dim)

    @nn.compact
    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array,
                 sparse_prompt_embeddings: jax.Array, dense_prompt_embeddings: jax.Array,
                 multimask_output: bool) -> tuple[jax.Array, jax.Array]:
        """Decode N prompts.

        image_embeddings (1 or N, h, w, C); image_pe (1, h, w, C); sparse (N, Ns, C);
        dense (1 or N, h, w, C). A batch of 1 is shared by all N prompts (broadcast, no copy).
        Returns masks (N, M, 4h, 4w) (low-res logits) and iou (N, M).
        """
        dim = self.transformer_dim
        num_prompts = sparse_prompt_embeddings.shape[0]
        for name, array in (("image_embeddings", image_embeddings),
                            ("dense_prompt_embeddings", dense_prompt_embeddings),
                            ("image_pe", image_pe)):
            if array.shape[0] not in (1, num_prompts):
                raise ValueError(f"{name} has batch {array.shape[0]}; expected 1 or the "
                                 f"number of prompts ({num_prompts})")

        num_mask_tokens = self.num_multimask_outputs + 1
        iou_token = self.param("iou_token", _embedding_init, (1, dim))
        mask_tokens = self.param("mask_tokens", _embedding_init, (num_mask_tokens, dim))
        output_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0)
        output_tokens = jnp.broadcast_to(output_tokens[None], (num_prompts, *output_tokens.shape))
        tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings], axis=1)

        src = image_embeddings + dense_prompt_embeddings    # (1 or N, h, w, C)
        _, height, width, _ = src.shape
        transformer = TwoWayTransformer(self.depth, dim, self.num_heads, self.mlp_dim,
                                        name="transformer")
        queries, keys = transformer(src, image_pe, tokens)
        iou_token_out = queries[:, 0]                         # (N, C)
        mask_tokens_out = queries[:, 1:1 + num_mask_tokens]   # (N, T, C)

        upscaled = OutputUpscaling(dim, name="output_upscaling")(
            keys.reshape(num_prompts, height, width, dim), interleave=False)
        hyper_in = jnp.stack(
            [MLP(dim, dim // 8, 3, name=f"output_hypernetworks_mlps_{t}")(mask_tokens_out[:, t])
             for t in range(num_mask_tokens)], axis=1)        # (N, T, C/8)
        iou_pred = MLP(self.iou_head_hidden_dim, num_mask_tokens, self.iou_head_depth,
                       name="iou_prediction_head")(iou_token_out)   # (N, T)

        # Select before the (large) mask product: single-mask decoding makes one mask, not four.
        selected = slice(1, None) if multimask_output else slice(0, 1)
        hyper = hyper_in[:, selected]                                      # (N, T', c)
        channels = upscaled.shape[-1]
        # Sub-pixel order (N, h, w, 2, 2, 2, 2, c): (N, 16hw, c) @ (N, c, T') -> (N, 16hw, T'),
        # then one transpose of the masks (T' is 1 or 3) into (N, T', 4h, 4w).
        masks = upscaled.reshape(num_prompts, -1, channels) @ jnp.swapaxes(hyper, 1, 2)
        masks = masks.reshape(*upscaled.shape[:-1], hyper.shape[1])
        return interleave_subpixels(masks), iou_pred[:, selected]
