"""SAM's ViT image encoder: MedSAM's ViT-B teacher (segment-anything ``image_encoder.py``).

Input (B, img, img, 3) in [0, 1] (MedSAM does no mean/std normalisation) -> embedding
(B, img/16, img/16, out_chans). The layer sequence is SAM's ImageEncoderViT:

    patch embed (conv k16 s16) -> + absolute position embedding
    -> depth x Block (windowed or global attention with decomposed relative positions, MLP)
    -> neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d)

Parameter names follow the PyTorch module names (``blocks_3/attn/qkv`` for ``blocks.3.attn.qkv``)
so that conversion (rep_medsam_jax/convert/vit.py) is a rename plus layout changes.

Precision: parameters are float32; ``dtype`` sets the compute type of the matmuls and convs
(bfloat16 on GPUs for the distillation teacher). The residual stream, LayerNorm statistics,
attention logits and softmax stay float32 whatever ``dtype`` is, because those are where
bfloat16 loses accuracy (ViT residual activations grow large and softmax needs the range).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rep_medsam_jax.models.config import ViTConfig
from rep_medsam_jax.models.layers import LayerNorm2d, gelu, torch_padding

_VIT_LAYERNORM_EPS = 1e-6


# --- window partition -------------------------------------------------------------------

def window_partition(x: jax.Array, window_size: int) -> tuple[jax.Array, tuple[int, int]]:
    """Split a token grid into non-overlapping square windows, zero-padding bottom/right first.

    x: (B, H, W, C) -> windows (B * nH * nW, ws, ws, C), window grid row-major within each
    image, images batch-major (SAM's order). Also returns the padded size (Hp, Wp).
    The padded tokens are zeros *after* norm1 and are not masked in attention (SAM does not).
    """
    batch, height, width, channels = x.shape
    pad_h = (-height) % window_size
    pad_w = (-width) % window_size
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.reshape(batch, padded_h // window_size, window_size,
                  padded_w // window_size, window_size, channels)
    windows = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(windows: jax.Array, window_size: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
    """Inverse of ``window_partition``: (B * nH * nW, ws, ws, C) -> (B, H, W, C), padding cropped."""
    padded_h, padded_w = padded_hw
    height, width = hw
    n_h, n_w = padded_h // window_size, padded_w // window_size
    batch = windows.shape[0] // (n_h * n_w)
    x = windows.reshape(batch, n_h, n_w, window_size, window_size, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    return x[:, :height, :width, :]


# --- relative positions -----------------------------------------------------------------

def linear_resize_matrix(in_length: int, out_length: int) -> np.ndarray:
    """(out_length, in_length) weights of PyTorch's 1-D ``interpolate(mode="linear")``.

    align_corners=False: source coordinate (i + 0.5) * in/out - 0.5, clamped at 0 below, and
    the right neighbour clamped to the last sample. Computed in float32 as PyTorch does.
    """
    scale = np.float32(in_length) / np.float32(out_length)
    source = (np.arange(out_length, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    source = np.maximum(source, np.float32(0.0))
    left = np.minimum(np.floor(source).astype(np.int64), in_length - 1)
    right = np.minimum(left + 1, in_length - 1)
    right_weight = (source - left.astype(np.float32)).astype(np.float32)
    matrix = np.zeros((out_length, in_length), np.float32)
    rows = np.arange(out_length)
    np.add.at(matrix, (rows, left), np.float32(1.0) - right_weight)
    np.add.at(matrix, (rows, right), right_weight)
    return matrix


def relative_position_index(q_size: int, k_size: int) -> np.ndarray:
    """(q_size, k_size) int table rows: SAM's ``get_rel_pos`` coordinates (float32, truncated).

    For q_size == k_size this is i - j + n - 1. When the sizes differ, the shorter axis is
    stretched to the longer one, as in SAM (never happens inside the image encoder).
    """
    q_stretch = np.float32(max(k_size / q_size, 1.0))
    k_stretch = np.float32(max(q_size / k_size, 1.0))
    q_coords = np.arange(q_size, dtype=np.float32)[:, None] * q_stretch
    k_coords = np.arange(k_size, dtype=np.float32)[None, :] * k_stretch
    relative = (q_coords - k_coords) + np.float32(k_size - 1) * k_stretch
    return relative.astype(np.int64)  # truncation toward zero, like torch's .long()


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative-position embeddings for every (query, key) pair along one axis.

    rel_pos: (L, C) table -> (q_size, k_size, C). A table whose length is not
    2 * max(q_size, k_size) - 1 is first linearly resized along its length (SAM's behaviour
    when a checkpoint was trained at another resolution).
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        resize = jnp.asarray(linear_resize_matrix(rel_pos.shape[0], length), rel_pos.dtype)
        rel_pos = jnp.einsum("ol,lc->oc", resize, rel_pos,
                             precision=jax.lax.Precision.HIGHEST)
    return rel_pos[relative_position_index(q_size, k_size)]


def decomposed_rel_pos_bias(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                            q_hw: tuple[int, int], k_hw: tuple[int, int]) -> jax.Array:
    """MViTv2's decomposed relative-position term added to the attention logits.

    q: (B, q_h, q_w, heads, head_dim), the *unscaled* query (SAM uses it so);
    rel_pos_h: (Lh, head_dim); rel_pos_w: (Lw, head_dim), shared by all heads.
    Returns (B, heads, q_h, q_w, k_h, k_w) float32:
    bias[b, n, y, x, ky, kx] = q[b,y,x,n] . Rh[y, ky] + q[b,y,x,n] . Rw[x, kx].
    """
    q_h, q_w = q_hw
    k_h, k_w = k_hw
    table_h = get_rel_pos(q_h, k_h, rel_pos_h).astype(q.dtype)  # (q_h, k_h, head_dim)
    table_w = get_rel_pos(q_w, k_w, rel_pos_w).astype(q.dtype)  # (q_w, k_w, head_dim)
    rel_h = jnp.einsum("byxnd,ykd->bnyxk", q, table_h, preferred_element_type=jnp.float32)
    rel_w = jnp.einsum("byxnd,xkd->bnyxk", q, table_w, preferred_element_type=jnp.float32)
    return rel_h[..., :, None] + rel_w[..., None, :]


# --- modules ----------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention over a token grid, with SAM's decomposed relative positions.

    x: (B, h, w, C) -> (B, h, w, C). ``rel_pos_size`` is the (h, w) grid the relative-position
    tables are sized for: tables (2h - 1, head_dim) and (2w - 1, head_dim).
    """

    dim: int
    num_heads: int
    qkv_bias: bool = True
    use_rel_pos: bool = True
    rel_pos_size: tuple[int, int] = (14, 14)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, _ = x.shape
        head_dim = self.dim // self.num_heads
        # The 3*dim outputs are [q | k | v], each split into contiguous heads, as in SAM.
        qkv = nn.Dense(3 * self.dim, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(batch, height, width, 3, self.num_heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # (B, h, w, n, d)

        tokens = height * width
        q_seq = q.reshape(batch, tokens, self.num_heads, head_dim)
        k_seq = k.reshape(batch, tokens, self.num_heads, head_dim)
        v_seq = v.reshape(batch, tokens, self.num_heads, head_dim)
        scale = head_dim ** -0.5
        logits = jnp.einsum("bqnd,bknd->bnqk", q_seq * jnp.asarray(scale, q_seq.dtype), k_seq,
                            preferred_element_type=jnp.float32)

        if self.use_rel_pos:
            rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros,
                                   (2 * self.rel_pos_size[0] - 1, head_dim))
            rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros,
                                   (2 * self.rel_pos_size[1] - 1, head_dim))
            bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, (height, width),
                                           (height, width))
            logits = logits.reshape(batch, self.num_heads, height, width, height, width) + bias
            logits = logits.reshape(batch, self.num_heads, tokens, tokens)

        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bnqk,bknd->bqnd", weights, v_seq)
        # Heads merged head-major: channel index = head * head_dim + d, as in SAM.
        out = out.reshape(batch, height, width, self.dim)
        return nn.Dense(self.dim, dtype=self.dtype, name="proj")(out)


class MLPBlock(nn.Module):
    """SAM's MLPBlock: lin1 -> exact GELU -> lin2. x: (..., dim) -> (..., dim)."""

    dim: int
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="lin1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="lin2")(gelu(x))


def _vit_layernorm(name: str, dtype: Any) -> nn.LayerNorm:
    # Two-pass variance like torch.nn.LayerNorm: the one-pass form loses digits on the large
    # residual activations of a trained ViT.
    return nn.LayerNorm(epsilon=_VIT_LAYERNORM_EPS, use_fast_variance=False, dtype=dtype,
                        name=name)


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention when ``window_size`` > 0, else global.

    x: (B, H, W, C) float32 residual stream -> (B, H, W, C) float32.
    """

    dim: int
    num_heads: int
    mlp_dim: int
    qkv_bias: bool
    use_rel_pos: bool
    window_size: int
    grid_size: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        height, width = x.shape[1], x.shape[2]
        windowed = self.window_size > 0
        rel_pos_size = (self.window_size, self.window_size) if windowed else self.grid_size

        shortcut = x
        x = _vit_layernorm("norm1", self.dtype)(x)
        if windowed:
            x, padded_hw = window_partition(x, self.window_size)
        x = Attention(self.dim, self.num_heads, qkv_bias=self.qkv_bias,
                      use_rel_pos=self.use_rel_pos, rel_pos_size=rel_pos_size,
                      dtype=self.dtype, name="attn")(x)
        if windowed:
            x = window_unpartition(x, self.window_size, padded_hw, (height, width))
        x = shortcut + x.astype(shortcut.dtype)

        y = MLPBlock(self.dim, self.mlp_dim, dtype=self.dtype,
                     name="mlp")(_vit_layernorm("norm2", self.dtype)(x))
        return x + y.astype(x.dtype)


class Neck(nn.Module):
    """SAM's neck: 1x1 conv (no bias), LayerNorm2d, 3x3 conv pad 1 (no bias), LayerNorm2d.

    x: (B, H, W, embed_dim) -> (B, H, W, out_chans) float32.
    """

    out_chans: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="conv1")(x)
        x = LayerNorm2d(name="norm1")(x.astype(jnp.float32))
        x = nn.Conv(self.out_chans, (3, 3), padding=torch_padding(3, 1), use_bias=False,
                    dtype=self.dtype, name="conv2")(x)
        return LayerNorm2d(name="norm2")(x.astype(jnp.float32))


class ViTImageEncoder(nn.Module):
    """SAM / MedSAM ViT image encoder (segment-anything ``ImageEncoderViT``).

    __call__(x: (B, img, img, 3) in [0, 1], train=False) ->
        (embedding (B, img/p, img/p, out_chans) float32,
         features {"patch_embed": (B, g, g, embed_dim) after the position embedding,
                   "block_{i}": (B, g, g, embed_dim) output of block i})
    There is no dropout; ``train`` is accepted for a uniform encoder interface.
    """

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        del train
        cfg = self.config
        if x.shape[1] % cfg.patch_size or x.shape[2] % cfg.patch_size:
            raise ValueError(f"input {x.shape} is not a multiple of the patch size {cfg.patch_size}")
        grid = (x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size)
        if cfg.use_abs_pos and grid != (cfg.grid_size, cfg.grid_size):
            # SAM adds a fixed-size position embedding: other input sizes are not supported.
            raise ValueError(f"input {x.shape[1:3]} gives a {grid} token grid; the position "
                             f"embedding is {cfg.grid_size}x{cfg.grid_size}")

        x = nn.Conv(cfg.embed_dim, (cfg.patch_size, cfg.patch_size),
                    strides=(cfg.patch_size, cfg.patch_size), padding="VALID", dtype=self.dtype,
                    name="patch_embed")(x)
        x = x.astype(jnp.float32)  # the residual stream stays float32
        if cfg.use_abs_pos:
            pos_embed = self.param("pos_embed", nn.initializers.zeros,
                                   (1, cfg.grid_size, cfg.grid_size, cfg.embed_dim))
            x = x + pos_embed
        features = {"patch_embed": x}

        mlp_dim = int(cfg.embed_dim * cfg.mlp_ratio)
        for i in range(cfg.depth):
            window_size = 0 if i in cfg.global_attn_indexes else cfg.window_size
            x = Block(cfg.embed_dim, cfg.num_heads, mlp_dim, qkv_bias=cfg.qkv_bias,
                      use_rel_pos=cfg.use_rel_pos, window_size=window_size,
                      grid_size=(cfg.grid_size, cfg.grid_size), dtype=self.dtype,
                      name=f"blocks_{i}")(x)
            features[f"block_{i}"] = x

        embedding = Neck(cfg.out_chans, dtype=self.dtype, name="neck")(x)
        return embedding, features
