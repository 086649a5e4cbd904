"""Model configurations, chosen by variant name.

A configuration travels with the weights (``config.json`` in a model directory), so every
shape-relevant hyper-parameter lives here and nowhere else.

RepViT rows follow the reference's ``[kernel, expansion, out_channels, use_se, use_hs, stride]``
layout (Rep-MedSAM's ``repvit_cfgs.py``). ``use_hs`` is kept for fidelity but ignored: the
reference uses GELU in both branches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

RepViTRow = tuple[int, int, int, int, int, int]

# Rep-MedSAM's repvit_m1_0_cfgs (``repvit_cfgs.py``): like RepViT-M1.0 but row 23 has stride 1
# and the stem (below) has strides 1/1, so 256x256 inputs give a 64x64 embedding.
_M1_0_ROWS: tuple[RepViTRow, ...] = (
    (3, 2, 56, 1, 0, 1), (3, 2, 56, 0, 0, 1), (3, 2, 56, 0, 0, 1),
    (3, 2, 112, 0, 0, 2),
    (3, 2, 112, 1, 0, 1), (3, 2, 112, 0, 0, 1), (3, 2, 112, 0, 0, 1),
    (3, 2, 224, 0, 1, 2),
    (3, 2, 224, 1, 1, 1), (3, 2, 224, 0, 1, 1), (3, 2, 224, 1, 1, 1), (3, 2, 224, 0, 1, 1),
    (3, 2, 224, 1, 1, 1), (3, 2, 224, 0, 1, 1), (3, 2, 224, 1, 1, 1), (3, 2, 224, 0, 1, 1),
    (3, 2, 224, 1, 1, 1), (3, 2, 224, 0, 1, 1), (3, 2, 224, 1, 1, 1), (3, 2, 224, 0, 1, 1),
    (3, 2, 224, 1, 1, 1), (3, 2, 224, 0, 1, 1), (3, 2, 224, 0, 1, 1),
    (3, 2, 448, 0, 1, 1),
    (3, 2, 448, 1, 1, 1), (3, 2, 448, 0, 1, 1),
)


def _rescale_rows(rows: tuple[RepViTRow, ...], widths: dict[int, int]) -> tuple[RepViTRow, ...]:
    """The same rows (strides, SE placement) with every width mapped through ``widths``."""
    return tuple((k, t, widths[c], se, hs, s) for (k, t, c, se, hs, s) in rows)


@dataclasses.dataclass(frozen=True)
class RepViTConfig:
    """A RepViT encoder: stem, the rows of blocks, and the SAM neck."""

    name: str
    stem_channels: tuple[int, int]          # (hidden, out) of the two stem convs
    rows: tuple[RepViTRow, ...]
    stem_strides: tuple[int, int] = (1, 1)
    neck_channels: int = 256

    @property
    def out_stride(self) -> int:
        stride = self.stem_strides[0] * self.stem_strides[1]
        for row in self.rows:
            stride *= row[5]
        return stride


# Original RepViT m0.9 / m1.5 widths with Rep-MedSAM's stride layout (stride-1 stem, no 4th
# downsample). m0.9: 48/96/192/384. m1.5: 64/128/256/512 with deeper stages (as in the
# original m1.5 list: 4+1 / 4+1 / 24+1 / 2 blocks).
_M0_9_ROWS = _rescale_rows(_M1_0_ROWS, {56: 48, 112: 96, 224: 192, 448: 384})

_M1_5_ROWS: tuple[RepViTRow, ...] = (
    (3, 2, 64, 1, 0, 1), (3, 2, 64, 0, 0, 1), (3, 2, 64, 1, 0, 1), (3, 2, 64, 0, 0, 1),
    (3, 2, 64, 0, 0, 1),
    (3, 2, 128, 0, 0, 2),
    (3, 2, 128, 1, 0, 1), (3, 2, 128, 0, 0, 1), (3, 2, 128, 1, 0, 1), (3, 2, 128, 0, 0, 1),
    (3, 2, 128, 0, 0, 1),
    (3, 2, 256, 0, 1, 2),
    *((3, 2, 256, 1, 1, 1), (3, 2, 256, 0, 1, 1)) * 11,
    (3, 2, 256, 0, 1, 1),
    (3, 2, 512, 0, 1, 1),
    (3, 2, 512, 1, 1, 1), (3, 2, 512, 0, 1, 1),
)

# A tiny variant for tests and demos: same block kinds (SE, downsample, transition, identity)
# and the same overall stride 4, at a fraction of the compute.
_TINY_ROWS: tuple[RepViTRow, ...] = (
    (3, 2, 16, 1, 0, 1),
    (3, 2, 32, 0, 0, 2),
    (3, 2, 32, 1, 0, 1),
    (3, 2, 64, 0, 1, 2),
    (3, 2, 64, 1, 1, 1), (3, 2, 64, 0, 1, 1),
    (3, 2, 96, 0, 1, 1),
    (3, 2, 96, 1, 1, 1),
)

REPVIT_VARIANTS: dict[str, RepViTConfig] = {
    "rep_medsam_m1_0": RepViTConfig("rep_medsam_m1_0", (28, 56), _M1_0_ROWS),
    "rep_medsam_m0_9": RepViTConfig("rep_medsam_m0_9", (24, 48), _M0_9_ROWS),
    "rep_medsam_m1_5": RepViTConfig("rep_medsam_m1_5", (32, 64), _M1_5_ROWS),
    "rep_medsam_tiny": RepViTConfig("rep_medsam_tiny", (8, 16), _TINY_ROWS, neck_channels=64),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """SAM's ViT image encoder (MedSAM's teacher; MedSAM ``build_sam.py`` ``vit_b``)."""

    name: str = "medsam_vit_b"
    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256
    qkv_bias: bool = True
    use_rel_pos: bool = True
    use_abs_pos: bool = True

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


VIT_VARIANTS: dict[str, ViTConfig] = {
    "medsam_vit_b": ViTConfig(),
    # Small enough for CPU tests: 128x128 input, 8x8 tokens, windows of 3 (so padding happens).
    "vit_tiny": ViTConfig(name="vit_tiny", img_size=128, embed_dim=64, depth=4, num_heads=4,
                          window_size=3, global_attn_indexes=(1, 3), out_chans=256),
    # The demo's teacher for the tiny student at 64 x 64 (a 16 x 16 x 64 embedding).
    "vit_demo": ViTConfig(name="vit_demo", img_size=256, embed_dim=64, depth=2, num_heads=2,
                          window_size=4, global_attn_indexes=(1,), out_chans=64),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """SAM prompt encoder + mask decoder sizes. Defaults are LiteMedSAM's and Rep-MedSAM's."""

    embed_dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole promptable model: an image encoder plus SAM's prompt encoder and mask decoder.

    ``encoder`` is ``"repvit"`` (``encoder_variant`` in REPVIT_VARIANTS), ``"vit"``
    (``encoder_variant`` in VIT_VARIANTS) or ``"none"`` (a converted LiteMedSAM: heads only).
    ``image_size`` is the square input the prompt encoder normalises box coordinates by;
    the embedding grid is ``image_size / encoder stride`` (64 for every shipped model).
    """

    encoder: str = "repvit"
    encoder_variant: str = "rep_medsam_m1_0"
    deployed: bool = False          # True: the encoder holds folded (re-parameterised) weights
    image_size: int = 256
    embedding_size: int = 64
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        data["decoder"] = DecoderConfig(**data.get("decoder", {}))
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        if self.encoder == "repvit" and self.encoder_variant not in REPVIT_VARIANTS:
            raise ValueError(f"unknown RepViT variant {self.encoder_variant!r}; "
                             f"known: {sorted(REPVIT_VARIANTS)}")
        if self.encoder == "vit" and self.encoder_variant not in VIT_VARIANTS:
            raise ValueError(f"unknown ViT variant {self.encoder_variant!r}; "
                             f"known: {sorted(VIT_VARIANTS)}")
        if self.encoder not in ("repvit", "vit", "none"):
            raise ValueError(f"unknown encoder kind {self.encoder!r}")


MODEL_PRESETS: dict[str, ModelConfig] = {
    "rep_medsam": ModelConfig(),
    # Tests and demos: a 64-wide embedding and a slim decoder, same structure throughout.
    "rep_medsam_tiny": ModelConfig(encoder_variant="rep_medsam_tiny",
                                   decoder=DecoderConfig(embed_dim=64, num_heads=4, mlp_dim=256,
                                                         iou_head_hidden_dim=64)),
    "medsam_vit_b": ModelConfig(encoder="vit", encoder_variant="medsam_vit_b", image_size=1024),
    "litemedsam_heads": ModelConfig(encoder="none", encoder_variant=""),
}
