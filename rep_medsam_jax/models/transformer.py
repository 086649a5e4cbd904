"""SAM's two-way transformer (segment-anything ``transformer.py``): prompt tokens and image
tokens attend to each other.

Shapes are (B, N, C) token sequences. Image-side inputs may have batch 1 while the prompt
tokens have batch N (one image, many boxes): the image-side work before the first image->token
update is then done once, not N times.

How the attention products are written is chosen for the exported ONNX model on a CPU (the maths
is SAM's; results differ from the plain form by float rounding only):

* Every product is a 2-D matrix product or a batched one whose batch dims are equal. A batch of
  1 broadcast against N inside ``@`` exports as an Einsum node (slow in onnxruntime); instead the
  shared side is projected once and the heads become the batch.
* Few tokens (Nt, 7 for a box) meet many image tokens (h*w = 4096), and the projections are
  linear, so the projection matrices are folded into the few tokens: scores against the image
  tokens are then one product with (heads * Nt) columns per prompt instead of a (4096, C) x
  (C, C/2) projection per prompt, and no (4096, heads, d) head transposes are made. SAM's
  decoder has heads * Nt = 56 < 128 = C/2, so this does less than half the arithmetic.
* Biases are added where the tensor is small (bias identities in the functions below), and
  LayerNorm subtracts the mean once (flax's LayerNorm, exported, computed ``x - mean`` twice).

The exported decoder took 0.64-0.76x the time of the plain form on a 2-core CPU for 1-16 boxes
(benchmarks/compare_decoders.py), outputs equal to 4e-7.

LayerNorms use eps 1e-5 (PyTorch ``nn.LayerNorm``), not Flax's 1e-6.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_TORCH_LAYER_NORM_EPS = 1e-5

Linear = tuple[jax.Array, jax.Array]   # (kernel (in, out), bias (out,)), as in nn.Dense


class LayerNorm(nn.Module):
    """``nn.LayerNorm(epsilon, use_fast_variance=False)`` over the last axis: (..., C) -> (..., C).

    Same parameters (``scale``, ``bias``) and arithmetic as flax's, with a two-pass variance
    (PyTorch's numerics, and no cancellation when the mean is large), but ``x - mean`` made once.
    """

    epsilon: float = _TORCH_LAYER_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (channels,))
        bias = self.param("bias", nn.initializers.zeros_init(), (channels,))
        centered = x - jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        return centered * (jax.lax.rsqrt(variance + self.epsilon) * scale) + bias


def _layer_norm(name: str) -> LayerNorm:
    return LayerNorm(name=name)


class DenseParams(nn.Module):
    """The parameters of an ``nn.Dense(out_features)`` on ``in_features`` inputs, unapplied.

    Same names (``kernel`` (in, out), ``bias`` (out,)), shapes and initialisers as nn.Dense, so
    checkpoints convert unchanged; the attention below multiplies them in its own order.
    """

    in_features: int
    out_features: int

    @nn.compact
    def __call__(self) -> Linear:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (self.in_features, self.out_features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.out_features,))
        return kernel, bias


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """x @ kernel + bias: (..., in) -> (..., out), for a kernel (in, out) computed or rearranged.

    Applied as an unbound ``nn.Dense``: jax2onnx exports nn.Dense as one Gemm that adds the bias
    itself, but ``x @ kernel + bias`` as a Gemm then an Add over the whole output (or, for N-D
    x, as an Einsum).
    """
    return nn.Dense(kernel.shape[-1], parent=None).apply(
        {"params": {"kernel": kernel, "bias": bias}}, x)


def _linear(x: jax.Array, layer: Linear) -> jax.Array:
    return linear(x, *layer)


def _per_head(kernel: jax.Array, num_heads: int) -> jax.Array:
    """A projection kernel (C, heads * d) -> (heads, C, d): each head's columns."""
    channels, width = kernel.shape
    return kernel.reshape(channels, num_heads, width // num_heads).transpose(1, 0, 2)


def _by_head(x: jax.Array, num_heads: int) -> jax.Array:
    """Projected tokens (B, N, heads * d) -> (heads, B * N, d): heads are contiguous chunks."""
    batch, tokens, width = x.shape
    return x.reshape(batch * tokens, num_heads, width // num_heads).transpose(1, 0, 2)


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, N, heads * d) -> (B, heads, N, d); heads are contiguous channel chunks."""
    batch, tokens, channels = x.shape
    return x.reshape(batch, tokens, num_heads, channels // num_heads).transpose(0, 2, 1, 3)


def _merge_heads(x: jax.Array) -> jax.Array:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)


def _mix_values(probs: jax.Array, v: jax.Array, v_proj: Linear, out_proj: Linear) -> jax.Array:
    """Attention output for few values: probs (B, Nq, heads, Nk), v (B, Nk, C) -> (B, Nq, C_out).

    out = Σ_h probs_h @ (v W_v,h + b_v,h) @ W_o,h + b_o, with the output projection folded into
    the few values first: the one product per prompt has heads * Nk inner columns (56 for a
    box), not a (Nq, heads * d) x (heads * d, C_out) projection after the attention.
    """
    batch, queries, heads, keys = probs.shape
    out_kernel, out_bias = out_proj
    head_dim = out_kernel.shape[0] // heads
    values = _by_head(_linear(v, v_proj), heads)                          # (heads, B*Nk, d)
    # Each head's probabilities sum to 1, so all of them to ``heads``: b_o / heads added to
    # every mixed value adds b_o once, without a pass over the (B, Nq, C_out) output.
    mixed = values @ out_kernel.reshape(heads, head_dim, -1) + out_bias / heads
    mixed = mixed.reshape(heads, batch, keys, -1).transpose(1, 0, 2, 3)
    mixed = mixed.reshape(batch, heads * keys, -1)                        # (B, heads*Nk, C_out)
    return probs.reshape(batch, queries, heads * keys) @ mixed


def _attend_shared_keys(q, k, v, layers: tuple[Linear, ...], num_heads: int) -> jax.Array:
    """q (N, Nq, C); k, v (1, Nk, C) shared by all N -> (N, Nq, C).

    k and v are projected once; the heads are the batch of the products.
    """
    q_proj, k_proj, v_proj, out_proj = layers
    prompts, queries, _ = q.shape
    width = q_proj[0].shape[1]
    head_dim = width // num_heads
    qh = _by_head(_linear(q, q_proj), num_heads)                          # (heads, N*Nq, d)
    kh = _by_head(_linear(k, k_proj), num_heads)                          # (heads, Nk, d)
    vh = _by_head(_linear(v, v_proj), num_heads)                          # (heads, Nk, d)
    scores = (qh @ jnp.swapaxes(kh, 1, 2)) / math.sqrt(head_dim)          # (heads, N*Nq, Nk)
    out = jax.nn.softmax(scores, axis=-1) @ vh                            # (heads, N*Nq, d)
    out = out.transpose(1, 0, 2).reshape(prompts, queries, width)
    return _linear(out, out_proj)


def _attend_shared_queries(q, k, v, layers: tuple[Linear, ...], num_heads: int) -> jax.Array:
    """q (1, Nq, C) shared by all N; k, v (N, Nk, C) -> (N, Nq, C).

    q is projected once; the heads are the batch of the score product.
    """
    q_proj, k_proj, v_proj, out_proj = layers
    prompts, keys, _ = k.shape
    queries = q.shape[1]
    head_dim = q_proj[0].shape[1] // num_heads
    qh = _by_head(_linear(q, q_proj), num_heads)                          # (heads, Nq, d)
    kh = _by_head(_linear(k, k_proj), num_heads)                          # (heads, N*Nk, d)
    scores = (qh @ jnp.swapaxes(kh, 1, 2)) / math.sqrt(head_dim)          # (heads, Nq, N*Nk)
    probs = jax.nn.softmax(scores.reshape(num_heads, queries, prompts, keys), axis=-1)
    return _mix_values(probs.transpose(2, 1, 0, 3), v, v_proj, out_proj)


def _attend_few_queries(q, k, v, layers: tuple[Linear, ...], num_heads: int) -> jax.Array:
    """Few queries q (B, Nq, C), many keys k, v (B, Nk, C) -> (B, Nq, C).

    The key and value projections act on the queries' side instead of on every key:
    (k_j W_k,h + b_k,h) · q_h = k_j · (W_k,h q_h) + b_k,h · q_h, where b_k,h · q_h is the
    same for every key j and so cancels in the softmax over j; and, as each query's
    probabilities sum to 1, Σ_j p_j (v_j W_v,h + b_v,h) = (Σ_j p_j v_j) W_v,h + b_v,h.
    """
    q_proj, k_proj, v_proj, out_proj = layers
    batch, queries, _ = q.shape
    channels = k.shape[-1]
    width = q_proj[0].shape[1]
    head_dim = width // num_heads
    qh = _by_head(_linear(q, q_proj), num_heads)                          # (heads, B*Nq, d)
    folded = _per_head(k_proj[0], num_heads) @ jnp.swapaxes(qh, 1, 2)     # (heads, C, B*Nq)
    folded = folded.reshape(num_heads, channels, batch, queries).transpose(2, 0, 3, 1)
    folded = folded.reshape(batch, num_heads * queries, channels)         # (B, heads*Nq, C)
    scores = (folded @ jnp.swapaxes(k, 1, 2)) / math.sqrt(head_dim)       # (B, heads*Nq, Nk)
    pooled = jax.nn.softmax(scores, axis=-1) @ v                          # (B, heads*Nq, C)
    pooled = pooled.reshape(batch, num_heads, queries, channels).transpose(1, 0, 2, 3)
    pooled = pooled.reshape(num_heads, batch * queries, channels)
    out = pooled @ _per_head(v_proj[0], num_heads) + v_proj[1].reshape(num_heads, 1, head_dim)
    out = out.transpose(1, 0, 2).reshape(batch, queries, width)           # (B, Nq, heads*d)
    return _linear(out, out_proj)


def _attend_few_keys(q, k, v, layers: tuple[Linear, ...], num_heads: int) -> jax.Array:
    """Many queries q (B, Nq, C), few keys k, v (B, Nk, C) -> (B, Nq, C).

    The query projection acts on the keys' side: (q_i W_q,h + b_q,h) · k_h
    = q_i · (W_q,h k_h) + b_q,h · k_h; the output projection is folded into the values.
    """
    q_proj, k_proj, v_proj, out_proj = layers
    batch, keys, _ = k.shape
    queries, channels = q.shape[1], q.shape[-1]
    head_dim = q_proj[0].shape[1] // num_heads
    kh = jnp.swapaxes(_by_head(_linear(k, k_proj), num_heads), 1, 2)      # (heads, d, B*Nk)
    folded = _per_head(q_proj[0], num_heads) @ kh                         # (heads, C, B*Nk)
    folded = folded.reshape(num_heads, channels, batch, keys).transpose(2, 1, 0, 3)
    # The 1/sqrt(d) scale goes on the small factors, not on the (B, Nq, heads*Nk) scores.
    scale = 1.0 / math.sqrt(head_dim)
    folded = folded.reshape(batch, channels, num_heads * keys) * scale    # (B, C, heads*Nk)
    offset = q_proj[1].reshape(num_heads, 1, head_dim) @ kh               # (heads, 1, B*Nk)
    offset = offset.reshape(num_heads, batch, keys).transpose(1, 0, 2)
    offset = offset.reshape(batch, 1, num_heads * keys) * scale
    scores = q @ folded + offset                                          # (B, Nq, heads*Nk)
    probs = jax.nn.softmax(scores.reshape(batch, queries, num_heads, keys), axis=-1)
    return _mix_values(probs, v, v_proj, out_proj)


def _attend(q, k, v, layers: tuple[Linear, ...], num_heads: int) -> jax.Array:
    """The plain form, q (B, Nq, C), k, v (B, Nk, C) -> (B, Nq, C)."""
    q_proj, k_proj, v_proj, out_proj = layers
    head_dim = q_proj[0].shape[1] // num_heads
    qh = _split_heads(_linear(q, q_proj), num_heads)
    kh = _split_heads(_linear(k, k_proj), num_heads)
    vh = _split_heads(_linear(v, v_proj), num_heads)
    scores = (qh @ jnp.swapaxes(kh, -1, -2)) / math.sqrt(head_dim)       # (B, heads, Nq, Nk)
    out = jax.nn.softmax(scores, axis=-1) @ vh                            # (B, heads, Nq, d)
    return _linear(_merge_heads(out), out_proj)


class Attention(nn.Module):
    """Multi-head attention whose projections shrink the width by ``downsample_rate``.

    q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C); a batch of 1 on either side is shared by
    the other side's B. No masking, no dropout. Parameters are those of four nn.Dense layers
    (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``); the order of the products depends on
    the shapes (module docstring), the result does not.
    """

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        internal_dim = self.embedding_dim // self.downsample_rate
        if internal_dim % self.num_heads:
            raise ValueError(f"{self.num_heads} heads do not divide width {internal_dim}")
        layers = (DenseParams(q.shape[-1], internal_dim, name="q_proj")(),
                  DenseParams(k.shape[-1], internal_dim, name="k_proj")(),
                  DenseParams(v.shape[-1], internal_dim, name="v_proj")(),
                  DenseParams(internal_dim, self.embedding_dim, name="out_proj")())
        (q_batch, queries), (k_batch, keys) = q.shape[:2], k.shape[:2]
        if v.shape[0] != k_batch:
            raise ValueError(f"keys have batch {k_batch}, values {v.shape[0]}")
        if k_batch == 1 and q_batch != 1:
            attend = _attend_shared_keys
        elif q_batch == 1 and k_batch != 1:
            attend = _attend_shared_queries
        elif self.num_heads * queries < min(internal_dim, keys):
            attend = _attend_few_queries
        elif self.num_heads * keys < min(internal_dim, queries):
            attend = _attend_few_keys
        else:
            attend = _attend
        return attend(q, k, v, layers, self.num_heads)


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

        # The keys do not change until the last step: one keys + PE serves both cross-attentions.
        k = keys + key_pe
        queries = queries + Attention(dim, heads, rate, name="cross_attn_token_to_image")(
            queries + query_pe, k, keys)
        queries = _layer_norm("norm2")(queries)

        queries = _layer_norm("norm3")(queries + MLPBlock(dim, self.mlp_dim, name="mlp")(queries))

        q = queries + query_pe
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
