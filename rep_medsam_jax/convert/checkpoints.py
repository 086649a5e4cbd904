"""PyTorch checkpoints of MedSAM, LiteMedSAM and Rep-MedSAM -> (ModelConfig, variables).

Three layouts (all ``torch.save`` state dicts):

* ``medsam``: SAM's key layout with a ViT-B image encoder (``image_encoder.patch_embed...``);
* ``litemedsam``: TinyViT encoder (``image_encoder.patch_embed.seq...``). Its prompt encoder and
  mask decoder are converted; the TinyViT encoder is reported as not converted;
* ``rep-medsam``: the whole unfused Rep-MedSAM model (``image_encoder.features...``).

Conversion is strict: every expected key must be present with its shape and no key may be left
over, and all problems are reported together in one ``CheckpointMismatchError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from rep_medsam_jax.convert.state_dict import StateDictReader
from rep_medsam_jax.models.config import (MODEL_PRESETS, REPVIT_VARIANTS, VIT_VARIANTS,
                                          ModelConfig)

KINDS = ("medsam", "litemedsam", "rep-medsam")

# One key that only each layout has.
_SIGNATURES = {
    "medsam": "image_encoder.patch_embed.proj.weight",
    "litemedsam": "image_encoder.patch_embed.seq.0.c.weight",
    "rep-medsam": "image_encoder.features.0.0.c.weight",
}


class WrongCheckpointKindError(ValueError):
    """The checkpoint is of another kind than the one asked for, or of no known kind."""


def detect_kind(state: Mapping[str, np.ndarray]) -> str | None:
    """Which of the three layouts ``state`` has, by its signature key; None if none."""
    for kind, key in _SIGNATURES.items():
        if key in state:
            return kind
    return None


def _check_kind(state: Mapping[str, np.ndarray], kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {KINDS}")
    found = detect_kind(state)
    if found == kind:
        return
    if found is None:
        sample = ", ".join(list(state)[:3])
        raise WrongCheckpointKindError(
            f"not a {kind} checkpoint: none of the MedSAM / LiteMedSAM / Rep-MedSAM layouts "
            f"matches (first keys: {sample})")
    raise WrongCheckpointKindError(
        f"this is a {found} checkpoint, not a {kind} one: convert it with --from {found}")


def _rep_medsam_config(state: Mapping[str, np.ndarray]) -> ModelConfig:
    """The variant whose stem widths match the checkpoint, with the matching decoder width.

    Only the stem shape and the decoder width choose it (the feature count breaks ties), so
    that a damaged checkpoint (an extra or missing block key) still reaches the strict key
    check and gets its full report instead of an "unknown variant" error.
    """
    stem = tuple(state["image_encoder.features.0.2.c.weight"].shape[:2])  # (C, C_hidden)
    n_features = len({k.split(".")[2] for k in state if k.startswith("image_encoder.features.")})
    embed = state.get("mask_decoder.iou_token.weight", np.zeros((1, 256))).shape[1]
    candidates = [v for v in REPVIT_VARIANTS.values() if v.stem_channels[::-1] == stem]
    if not candidates:
        raise WrongCheckpointKindError(
            f"Rep-MedSAM checkpoint with an unknown encoder width (stem conv {stem}); known "
            f"variants: {sorted(REPVIT_VARIANTS)}")
    candidates.sort(key=lambda v: len(v.rows) + 1 != n_features)
    variant = candidates[0]
    for preset in MODEL_PRESETS.values():
        if preset.encoder_variant == variant.name and preset.decoder.embed_dim == embed:
            return preset
    return dataclasses.replace(MODEL_PRESETS["rep_medsam"], encoder_variant=variant.name)


def _convert_heads(reader: StateDictReader, config: ModelConfig) -> tuple[dict, dict]:
    from rep_medsam_jax.convert.sam_heads import (convert_mask_decoder,  # noqa: PLC0415
                                                  convert_prompt_encoder)

    prompt = convert_prompt_encoder(reader, "prompt_encoder.", embed_dim=config.decoder.embed_dim)
    decoder = convert_mask_decoder(reader, "mask_decoder.", config.decoder)
    return prompt, decoder


def _merge(**parts: Mapping) -> dict:
    """{"params": {name: part["params"]}, "batch_stats": {...}} from per-module variables."""
    merged: dict[str, dict] = {"params": {}}
    for name, part in parts.items():
        for collection, tree in part.items():
            merged.setdefault(collection, {})[name] = tree
    return merged


def convert_state_dict(state: Mapping[str, np.ndarray], kind: str,
                       config: ModelConfig | None = None) -> tuple[ModelConfig, dict, list[str]]:
    """Convert a flat PyTorch state dict of the given kind.

    Returns ``(config, variables, notes)``; ``notes`` are human-readable remarks (e.g. that the
    TinyViT encoder was not converted). Raises ``WrongCheckpointKindError`` or
    ``CheckpointMismatchError``.
    """
    _check_kind(state, kind)
    reader = StateDictReader(state, context=f"a {kind} model")
    notes: list[str] = []
    if kind == "rep-medsam":
        from rep_medsam_jax.convert.repvit import convert_repvit  # noqa: PLC0415

        config = config or _rep_medsam_config(state)
        encoder = convert_repvit(reader, "image_encoder.",
                                 REPVIT_VARIANTS[config.encoder_variant])
        prompt, decoder = _convert_heads(reader, config)
        variables = _merge(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
    elif kind == "medsam":
        from rep_medsam_jax.convert.vit import convert_vit  # noqa: PLC0415

        config = config or MODEL_PRESETS["medsam_vit_b"]
        encoder = convert_vit(reader, "image_encoder.", VIT_VARIANTS[config.encoder_variant])
        prompt, decoder = _convert_heads(reader, config)
        variables = _merge(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
    else:  # litemedsam
        config = config or MODEL_PRESETS["litemedsam_heads"]
        skipped = reader.skip_prefix("image_encoder.")
        notes.append(f"TinyViT image encoder not converted ({len(skipped)} keys skipped): "
                     "only the prompt encoder and mask decoder were loaded")
        prompt, decoder = _convert_heads(reader, config)
        variables = _merge(prompt_encoder=prompt, mask_decoder=decoder)
    reader.finish()
    return config, variables, notes


def convert_checkpoint(path, kind: str, out_dir, overwrite: bool = False) -> tuple[ModelConfig,
                                                                                  list[str]]:
    """Read ``path`` (.pth), convert it and write a model directory at ``out_dir``.

    Nothing is written unless the whole conversion succeeds.
    """
    from rep_medsam_jax.convert.torch_io import load_torch_state_dict  # noqa: PLC0415
    from rep_medsam_jax.model_dir import save_model_dir  # noqa: PLC0415

    state = load_torch_state_dict(path)
    config, variables, notes = convert_state_dict(state, kind)
    save_model_dir(out_dir, config, variables, overwrite=overwrite,
                   metadata={"converted_from": str(path), "source_kind": kind, "notes": notes})
    return config, notes
