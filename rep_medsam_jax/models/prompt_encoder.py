"""SAM's prompt encoder (segment-anything ``prompt_encoder.py``), NHWC.

Prompts become two embeddings for the mask decoder:
* sparse (B, Ns, C): one token per point and two per box (its corners), each a random-Fourier
  positional encoding of the pixel position plus a learned "what kind of point" vector;
* dense (B, h, w, C): a downscaled mask prompt, or the learned ``no_mask_embed`` everywhere.

Parameter names keep the PyTorch names (``point_embeddings_0`` for ``point_embeddings.0.weight``,
``mask_downscaling/conv_0`` for ``mask_downscaling.0``) so that conversion is a rename.

The Gaussian matrix of the positional encoding is a PyTorch *buffer*: random at construction,
saved in the checkpoint, never trained. Here it lives in the ``params`` tree
(``params["pe_layer"]["positional_encoding_gaussian_matrix"]``) so that it travels with the
weights, and the forward pass wraps it in ``stop_gradient``. A trainer using weight decay must
still exclude it from the optimiser (e.g. ``optax.masked``), or decay would shrink it.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rep_medsam_jax.models.config import DecoderConfig
from rep_medsam_jax.models.layers import LayerNorm2d, gelu

# PyTorch's nn.Embedding initialises with N(0, 1).
_embedding_init = nn.initializers.normal(stddev=1.0)


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier features of 2-D positions: PE(u) = [sin(2π v), cos(2π v)], v = (2u−1) @ G.

    ``G`` is the (2, num_pos_feats) Gaussian matrix (row 0 multiplies x, row 1 multiplies y).
    """

    num_pos_feats: int = 128

    def setup(self):
        self.positional_encoding_gaussian_matrix = self.param(
            "positional_encoding_gaussian_matrix", _embedding_init, (2, self.num_pos_feats))

    def encode_normalized(self, coords: jax.Array) -> jax.Array:
        """(..., 2) positions in [0, 1]², ordered (x, y) -> (..., 2 * num_pos_feats), sin first."""
        # A buffer in the original: loaded, never learned.
        gaussian = jax.lax.stop_gradient(self.positional_encoding_gaussian_matrix)
        # A 2-D product: jax2onnx writes (..., 2) @ (2, F) as an Einsum node (slow in onnxruntime).
        flat = (2.0 * coords - 1.0).reshape(-1, 2) @ gaussian
        projected = 2.0 * jnp.pi * flat.reshape(*coords.shape[:-1], gaussian.shape[-1])
        return jnp.concatenate([jnp.sin(projected), jnp.cos(projected)], axis=-1)

    def encode_pixels(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """(..., 2) pixel positions (x, y) in an image of ``image_size`` = (H, W) -> (..., 2F)."""
        height, width = image_size
        scale = jnp.array([1.0 / width, 1.0 / height], jnp.float32)
        return self.encode_normalized(coords.astype(jnp.float32) * scale)

    def dense_grid(self, size: tuple[int, int]) -> jax.Array:
        """The encoding of every pixel centre of an (h, w) grid -> (h, w, 2F)."""
        height, width = size
        ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
        xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
        grid = jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
        return self.encode_normalized(grid)


class MaskDownscaling(nn.Module):
    """(B, 4h, 4w, 1) mask logits -> (B, h, w, embed_dim): two k2 s2 convs, then a 1x1 conv.

    Children are named after the PyTorch ``nn.Sequential`` indexes (2 and 5 are the GELUs).
    """

    embed_dim: int = 256
    mask_in_chans: int = 16

    @nn.compact
    def __call__(self, masks: jax.Array) -> jax.Array:
        x = nn.Conv(self.mask_in_chans // 4, (2, 2), strides=(2, 2), padding="VALID",
                    name="conv_0")(masks)
        x = gelu(LayerNorm2d(name="norm_1")(x))
        x = nn.Conv(self.mask_in_chans, (2, 2), strides=(2, 2), padding="VALID",
                    name="conv_3")(x)
        x = gelu(LayerNorm2d(name="norm_4")(x))
        return nn.Conv(self.embed_dim, (1, 1), padding="VALID", name="conv_6")(x)


class PromptEncoder(nn.Module):
    """Points, boxes and masks -> (sparse (B, Ns, C), dense (B, h, w, C)), SAM semantics.

    ``image_embedding_size`` is the (h, w) of the image embedding; ``input_image_size`` the
    (H, W) of the padded model input, in whose pixels points and boxes are given.
    """

    embed_dim: int = 256
    image_embedding_size: tuple[int, int] = (64, 64)
    input_image_size: tuple[int, int] = (256, 256)
    mask_in_chans: int = 16

    @classmethod
    def from_config(cls, config: DecoderConfig, image_size: int = 256,
                    embedding_size: int = 64) -> "PromptEncoder":
        return cls(embed_dim=config.embed_dim,
                   image_embedding_size=(embedding_size, embedding_size),
                   input_image_size=(image_size, image_size),
                   mask_in_chans=config.mask_in_chans)

    def setup(self):
        dim = self.embed_dim
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        # The four kinds of sparse token (SAM's point_embeddings.{0..3}).
        self.negative_point_embed = self.param("point_embeddings_0", _embedding_init, (1, dim))
        self.positive_point_embed = self.param("point_embeddings_1", _embedding_init, (1, dim))
        self.box_top_left_embed = self.param("point_embeddings_2", _embedding_init, (1, dim))
        self.box_bottom_right_embed = self.param("point_embeddings_3", _embedding_init, (1, dim))
        self.not_a_point_embed = self.param("not_a_point_embed", _embedding_init, (1, dim))
        self.no_mask_embed = self.param("no_mask_embed", _embedding_init, (1, dim))
        self.mask_downscaling = MaskDownscaling(dim, self.mask_in_chans)

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """The (4h, 4w) size a mask prompt must have."""
        return (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])

    def get_dense_pe(self) -> jax.Array:
        """The positional encoding of the image embedding grid -> (1, h, w, C)."""
        return self.pe_layer.dense_grid(self.image_embedding_size)[None]

    def _embed_points(self, coords: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """coords (B, Np, 2) pixels (x, y), labels (B, Np) -> (B, Np (+1 if pad), C).

        Label -1 marks "not a point" (its positional encoding is replaced, not added to),
        0 a negative point, 1 a positive one; any other label gets the encoding alone.
        """
        coords = coords.astype(jnp.float32) + 0.5  # pixel centre
        if pad:
            # SAM appends one not-a-point token when there is no box.
            batch = coords.shape[0]
            coords = jnp.concatenate([coords, jnp.zeros((batch, 1, 2), jnp.float32)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((batch, 1), labels.dtype)], axis=1)
        encoding = self.pe_layer.encode_pixels(coords, self.input_image_size)
        labels = labels[..., None]
        encoding = jnp.where(labels == -1, self.not_a_point_embed, encoding)
        encoding = encoding + jnp.where(labels == 0, self.negative_point_embed, 0.0)
        return encoding + jnp.where(labels == 1, self.positive_point_embed, 0.0)

    def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """(..., 4) boxes [x0, y0, x1, y1] in pixels -> (B, 2, C), B = number of boxes."""
        corners = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2)  # pixel centres
        encoding = self.pe_layer.encode_pixels(corners, self.input_image_size)
        corner_kinds = jnp.concatenate([self.box_top_left_embed, self.box_bottom_right_embed])
        return encoding + corner_kinds[None]

    def __call__(self, points: Optional[tuple[jax.Array, jax.Array]] = None,
                 boxes: Optional[jax.Array] = None,
                 masks: Optional[jax.Array] = None,
                 shared_dense: bool = False) -> tuple[jax.Array, jax.Array]:
        """Embed the prompts given.

        points: (coords (B, Np, 2) pixels (x, y), labels (B, Np)); boxes: (B, 4) [x0, y0, x1, y1]
        pixels; masks: (B, 4h, 4w, 1). Returns sparse (B, Ns, C) (points first, then box corners)
        and dense (B, h, w, C). With no mask every row of dense is the same ``no_mask_embed``:
        the decoder accepts ``dense[:1]`` then, which lets boxes share image-side work.
        ``shared_dense=True`` returns that one row, (1, h, w, C), when there is no mask: an
        exported model would otherwise build all B rows (an ONNX Expand) before the slice.
        """
        if points is not None:
            batch = points[0].shape[0]
        elif boxes is not None:
            batch = boxes.reshape(-1, 4).shape[0]
        elif masks is not None:
            batch = masks.shape[0]
        else:
            batch = 1

        parts = []
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if parts:
            sparse = jnp.concatenate(parts, axis=1)
        else:
            sparse = jnp.zeros((batch, 0, self.embed_dim), jnp.float32)

        if masks is not None:
            dense = self.mask_downscaling(masks.astype(jnp.float32))
        else:
            if self.is_initializing():
                # Create the mask branch's parameters even when init sees no mask.
                self.mask_downscaling(jnp.zeros((1, *self.mask_input_size, 1), jnp.float32))
            height, width = self.image_embedding_size
            dense = jnp.broadcast_to(self.no_mask_embed.reshape(1, 1, 1, -1),
                                     (1 if shared_dense else batch, height, width,
                                      self.embed_dim))
        return sparse, dense
