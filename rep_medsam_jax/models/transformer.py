"""SAM's two-way transformer (SPEC §3.3): prompt tokens and image tokens attend to each other.

Shapes are (B, N, C) token sequences. Image-side inputs may have batch 1 while the prompt
tokens have batch N (one image, many boxes): every binary op and matmul broadcasts, so the
image-side work before the first image->token update is done once, not N times.

LayerNorms use eps 1e-5 (PyTorch ``nn.LayerNorm``), not Flax's 1e-6.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_TORCH_LAYER_NORM_EPS = 1e-5


def _layer_norm(name: str) -> nn.LayerNorm:
    # Two-pass variance: PyTorch's numerics, and no cancellation when the mean is large.
    return nn.LayerNorm(epsilon=_TORCH_LAYER_NORM_EPS, use_fast_variance=False, name=name)


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, N, heads * d) -> (B, heads, N, d); heads are contiguous channel chunks."""
    batch, tokens, channels = x.shape
    return x.reshape(batch, tokens, num_heads, channels // num_heads).transpose(0, 2, 1, 3)


def _merge_heads(x: jax.Array) -> jax.Array:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)


class Attention(nn.Module):
    """Multi-head attention whose projections shrink the width by ``downsample_rate``.

    q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C); batch dims of size 1 broadcast.
    No masking, no dropout.
    """

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        internal_dim = self.embedding_dim // self.downsample_rate
        if internal_dim % self.num_heads:
            raise ValueError(f"{self.num_heads} heads do not divide width {internal_dim}")
        q = _split_heads(nn.Dense(internal_dim, name="q_proj")(q), self.num_heads)
        k = _split_heads(nn.Dense(internal_dim, name="k_proj")(k), self.num_heads)
        v = _split_heads(nn.Dense(internal_dim, name="v_proj")(v), self.num_heads)
        head_dim = internal_dim // self.num_heads
        # matmul (not einsum) so that a batch of 1 on one side broadcasts against N.
        scores = (q @ jnp.swapaxes(k, -1, -2)) / math.sqrt(head_dim)   # (B, heads, Nq, Nk)
        out = jax.nn.softmax(scores, axis=-1) @ v                       # (B, heads, Nq, d)
        return nn.Dense(self.embedding_dim, name="out_proj")(_merge_heads(out))


class MLPBlock(nn.Module):
    """Linear -> ReLU -> Linear, (..., C) -> (..., C)."""

    embedding_dim: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(nn.Dense(self.mlp_dim, name="lin1")(x))
        return nn.Dense(self.embedding_dim, name="lin2")(x)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention.

    queries (N, Nt, C), keys (B, Nk, C), query_pe like queries, key_pe (1 or B, Nk, C)
    -> (queries (N, Nt, C), keys (N, Nk, C)). B may be 1 with N > 1 (broadcast).
    """

    embedding_dim: int
    num_heads: int
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    skip_first_layer_pe: bool = False

    @nn.compact
    def __call__(self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array,
                 key_pe: jax.Array) -> tuple[jax.Array, jax.Array]:
        dim, heads, rate = self.embedding_dim, self.num_heads, self.attention_downsample_rate
        self_attn = Attention(dim, heads, name="self_attn")
        if self.skip_first_layer_pe:
            # The first layer's tokens carry no separate PE yet: no PE and, as in SAM, no residual.
            queries = self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries)
        queries = _layer_norm("norm1")(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = queries + Attention(dim, heads, rate, name="cross_attn_token_to_image")(q, k, keys)
        queries = _layer_norm("norm2")(queries)

        queries = _layer_norm("norm3")(queries + MLPBlock(dim, self.mlp_dim, name="mlp")(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = keys + Attention(dim, heads, rate, name="cross_attn_image_to_token")(k, q, queries)
        keys = _layer_norm("norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks, then a final token->image attention.

    image_embedding (B, h, w, C), image_pe (1 or B, h, w, C), point_embedding (N, Nt, C), with
    B = N or B = 1 -> (queries (N, Nt, C), keys (N, h*w, C)).
    """

    depth: int = 2
    embedding_dim: int = 256
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2

    @nn.compact
    def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
                 point_embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
        num_prompts = point_embedding.shape[0]
        # (B, h, w, C) -> (B, h*w, C): row-major, as PyTorch's flatten(2) of NCHW.
        keys = image_embedding.reshape(image_embedding.shape[0], -1, image_embedding.shape[-1])
        key_pe = image_pe.reshape(image_pe.shape[0], -1, image_pe.shape[-1])
        queries = point_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.embedding_dim, self.num_heads, self.mlp_dim,
                self.attention_downsample_rate, skip_first_layer_pe=(i == 0),
                name=f"layers_{i}")(queries, keys, point_embedding, key_pe)

        q, k = queries + point_embedding, keys + key_pe
        final_attn = Attention(self.embedding_dim, self.num_heads,
                               self.attention_downsample_rate, name="final_attn_token_to_image")
        queries = _layer_norm("norm_final_attn")(queries + final_attn(q, k, keys))
        # Keys are already per prompt after the first block; this only matters for depth 0.
        keys = jnp.broadcast_to(keys, (num_prompts, *keys.shape[1:]))
        return queries, keys
