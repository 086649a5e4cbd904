"""The composed promptable model: image encoder + SAM prompt encoder + mask decoder.

Variables: ``{"params": {"image_encoder", "prompt_encoder", "mask_decoder"},
"batch_stats": {"image_encoder"}}`` (no batch_stats for a folded encoder or a ViT).

Use the methods through ``apply``::

    model = build_model(config)
    embeddings, features = model.apply(variables, images, method=model.encode)
    logits, iou = model.apply(variables, embeddings[:1], boxes, method=model.decode)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rep_medsam_jax.models.config import (REPVIT_VARIANTS, VIT_VARIANTS, ModelConfig)
from rep_medsam_jax.models.mask_decoder import MaskDecoder
from rep_medsam_jax.models.prompt_encoder import PromptEncoder


class MedSAMLite(nn.Module):
    """Images (B, S, S, 3) in [0, 1] and boxes in the S x S frame -> low-res logits and IoU.

    S = ``config.image_size``; the embedding is (B, S/4... = embedding_size, embedding_size, C).
    """

    config: ModelConfig

    def setup(self):
        config = self.config
        if config.encoder == "repvit":
            from rep_medsam_jax.models.repvit import RepViT  # noqa: PLC0415

            self.image_encoder = RepViT(REPVIT_VARIANTS[config.encoder_variant],
                                        deploy=config.deployed)
        elif config.encoder == "vit":
            from rep_medsam_jax.models.vit import ViTImageEncoder  # noqa: PLC0415

            self.image_encoder = ViTImageEncoder(VIT_VARIANTS[config.encoder_variant])
        else:
            self.image_encoder = None
        size = (config.embedding_size, config.embedding_size)
        self.prompt_encoder = PromptEncoder(embed_dim=config.decoder.embed_dim,
                                            image_embedding_size=size,
                                            input_image_size=(config.image_size,) * 2,
                                            mask_in_chans=config.decoder.mask_in_chans)
        self.mask_decoder = MaskDecoder.from_config(config.decoder)

    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        """(B, S, S, 3) in [0, 1] -> (embeddings (B, h, w, C), named intermediates)."""
        if self.image_encoder is None:
            raise ValueError("this model has no image encoder (a LiteMedSAM heads-only import)")
        return self.image_encoder(images, train=train)

    def decode(self, embedding: jax.Array, boxes: jax.Array,
               multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
        """One or N embeddings and N boxes -> (logits (N, M, 4h, 4w), iou (N, M)).

        embedding: (1, h, w, C) shared by all boxes, or (N, h, w, C) one per box.
        boxes: (N, 4) [x0, y0, x1, y1] in the model's S x S input frame (float).
        M = 1 unless ``multimask_output``.
        """
        # Box-only prompts: every row of the dense embedding is the same no_mask_embed, so take
        # one row (never built N times: an exported model would Expand it) and let the decoder
        # broadcast; the image-side work before the first image->token update is then done
        # once for all boxes instead of once per box.
        sparse, dense = self.prompt_encoder(boxes=boxes, shared_dense=True)
        image_pe = self.prompt_encoder.get_dense_pe()
        return self.mask_decoder(embedding, image_pe, sparse, dense,
                                 multimask_output=multimask_output)

    def __call__(self, images: jax.Array, boxes: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Training forward: one box per image.

        images (B, S, S, 3), boxes (B, 4) -> (logits (B, 4h, 4w), iou (B,), embeddings).
        """
        embeddings, _ = self.encode(images, train=train)
        logits, iou = self.decode(embeddings, boxes)
        return logits[:, 0], iou[:, 0], embeddings


def build_model(config: ModelConfig) -> MedSAMLite:
    config.validate()
    return MedSAMLite(config)


def init_variables(config: ModelConfig, rng: jax.Array | int) -> dict:
    """Randomly initialised variables for ``config`` (all three parts), NumPy leaves.

    Fast on a CPU: drawing hundreds of parameter tensors with the default threefry generator
    makes ``init`` compile for tens of seconds (eager init is as slow). So the RepViT encoder is
    drawn on the host with NumPy (``init_repvit``, PyTorch's initialisation) and the rest is a
    jitted ``init`` with an ``rbg`` key. ``rng``: a JAX key or an int seed.
    """
    import numpy as np  # noqa: PLC0415

    seed = rng if isinstance(rng, int) else int(jax.random.randint(rng, (), 0, 2 ** 31 - 1))
    model = build_model(config)
    key = jax.random.key(seed, impl="rbg")
    boxes = jnp.array([[0.0, 0.0, 8.0, 8.0]], jnp.float32)
    if config.encoder == "vit":
        images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
        variables = jax.jit(model.init)(key, images, boxes)
        return jax.tree_util.tree_map(np.asarray, dict(variables))
    embedding = jnp.zeros((1, config.embedding_size, config.embedding_size,
                           config.decoder.embed_dim), jnp.float32)
    heads = jax.jit(lambda k: model.init(k, embedding, boxes, method=MedSAMLite.decode))(key)
    variables = jax.tree_util.tree_map(np.asarray, dict(heads))
    if config.encoder == "repvit":
        from rep_medsam_jax.models.repvit import init_repvit  # noqa: PLC0415

        encoder = init_repvit(seed, REPVIT_VARIANTS[config.encoder_variant],
                              deploy=config.deployed)
        for collection, tree in encoder.items():
            variables.setdefault(collection, {})["image_encoder"] = jax.tree_util.tree_map(
                np.asarray, tree)
    return variables
