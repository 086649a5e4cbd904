"""The deployable model: the RepViT encoder folded, and pure encode / decode functions.

What the JAX predictor runs and what the exporter traces to ONNX are the same two functions::

    config, variables = load_model_dir(model_dir)          # rep_medsam_jax.model_dir
    config, encode, decode = deployed_functions(config, variables)
    embeddings = encode(images)                  # (B, S, S, 3) in [0, 1] -> (B, h, w, C)
    logits, iou = decode(embeddings[:1], boxes)  # boxes (N, 4) -> (N, S, S), (N,)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from rep_medsam_jax.models.config import REPVIT_VARIANTS, ModelConfig


def deploy_variables(config: ModelConfig, variables: dict) -> tuple[ModelConfig, dict]:
    """Fold a training-form RepViT encoder (batch norms and parallel branches merged into single
    convolutions, as RepViT's ``fuse``); other models pass through."""
    if config.encoder != "repvit" or config.deployed:
        return config, variables
    from rep_medsam_jax.models.folding import fold  # noqa: PLC0415

    encoder = {"params": variables["params"]["image_encoder"],
               "batch_stats": variables["batch_stats"]["image_encoder"]}
    folded = fold(encoder, REPVIT_VARIANTS[config.encoder_variant])
    params = dict(variables["params"])
    params["image_encoder"] = folded["params"]
    return dataclasses.replace(config, deployed=True), {"params": params}


def model_functions(config: ModelConfig, variables: dict) -> tuple[Callable, Callable]:
    """Pure ``encode(images)`` and ``decode(embedding, boxes)`` closures over the variables."""
    from rep_medsam_jax.models.medsam_lite import MedSAMLite, build_model  # noqa: PLC0415

    model = build_model(config)

    def encode(images):
        embeddings, _ = model.apply(variables, images, method=MedSAMLite.encode)
        return embeddings

    def decode(embedding, boxes):
        logits, iou = model.apply(variables, embedding, boxes, method=MedSAMLite.decode)
        return logits[:, 0], iou[:, 0]

    return encode, decode


def deployed_model(config: ModelConfig, variables: dict, source: str = "the model"
                   ) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` as exported and predicted with: encoder folded, variables as
    NumPy arrays. Refuses a model without an image encoder; ``source`` names it in the error."""
    if config.encoder == "none":
        raise ValueError(f"{source} has no image encoder (LiteMedSAM heads only): "
                         "nothing to run as a full model")
    config, variables = deploy_variables(config, variables)
    return config, jax.tree_util.tree_map(np.asarray, variables)


def deployed_functions(config: ModelConfig, variables: dict, source: str = "the model"
                       ) -> tuple[ModelConfig, Callable, Callable]:
    """``(config, encode, decode)`` of :func:`deployed_model`."""
    config, variables = deployed_model(config, variables, source)
    encode, decode = model_functions(config, variables)
    return config, encode, decode
