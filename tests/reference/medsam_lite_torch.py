"""A PyTorch reference of the whole Rep-MedSAM model and its challenge inference.

The encoder is our own RepViT reference (``repvit_torch``); the prompt encoder and mask decoder
are segment-anything 1.0's originals. The inference functions follow
``CVPR24_LiteMedSAM_infer.py`` (``baseline_infer.py`` for the original 3D loop), quirks included
(``get_bbox256`` clips at 256), so that tests can compare our predictor against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.reference.repvit_torch import RepViT, randomize, replace_batchnorm
from tests.reference.sam_modeling import load_sam_modeling


class MedSAMLiteTorch(nn.Module):
    """``MedSAM_Lite``: attribute names are the checkpoint's key prefixes."""

    def __init__(self, rows: Sequence[Sequence[int]], embed_dim: int = 256, num_heads: int = 8,
                 mlp_dim: int = 2048, iou_hidden: int = 256):
        super().__init__()
        modeling = load_sam_modeling()
        self.image_encoder = RepViT(rows, neck_channels=embed_dim)
        self.prompt_encoder = modeling.PromptEncoder(
            embed_dim=embed_dim, image_embedding_size=(64, 64), input_image_size=(256, 256),
            mask_in_chans=16)
        self.mask_decoder = modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=embed_dim,
                                                   mlp_dim=mlp_dim, num_heads=num_heads),
            transformer_dim=embed_dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden)


def build_reference_model(rows, seed: int = 0, **decoder) -> MedSAMLiteTorch:
    """Seeded random weights, every BatchNorm randomised around the statistics of four noise
    images (``randomize``: the embedding depends on the image), eval mode."""
    torch.manual_seed(seed)
    model = MedSAMLiteTorch(rows, **decoder)
    calibration = torch.rand(4, 3, 256, 256, generator=torch.Generator().manual_seed(seed + 100))
    randomize(model.image_encoder, seed, calibration=calibration)
    return model.eval()


def fused_copy(model: MedSAMLiteTorch) -> MedSAMLiteTorch:
    """What the inference script runs: the image encoder BN-fused (``replace_batchnorm``)."""
    import copy

    fused = copy.deepcopy(model)
    replace_batchnorm(fused.image_encoder)
    return fused.eval()


# --- The script's preprocessing, the reference's way -----------------------------------------

def resize_longest_side(image: np.ndarray, target: int = 256) -> np.ndarray:
    h, w = image.shape[:2]
    scale = target * 1.0 / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def pad_image(image: np.ndarray, target: int = 256) -> np.ndarray:
    h, w = image.shape[:2]
    pad = ((0, target - h), (0, target - w)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad)


def image_tensor(image3: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    resized = resize_longest_side(image3, 256)
    new_hw = resized.shape[:2]
    normed = (resized - resized.min()) / np.clip(resized.max() - resized.min(), 1e-8, None)
    padded = pad_image(normed, 256)
    return torch.tensor(padded).float().permute(2, 0, 1).unsqueeze(0), new_hw


def resize_box_to_256(box: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    new_box = np.zeros_like(box)
    ratio = 256 / max(original_size)
    for i in range(len(box)):
        new_box[i] = int(box[i] * ratio)
    return new_box


def get_bbox256(mask_256: np.ndarray, bbox_shift: int = 3) -> np.ndarray:
    y_indices, x_indices = np.where(mask_256 > 0)
    x_min, x_max = np.min(x_indices), np.max(x_indices)
    y_min, y_max = np.min(y_indices), np.max(y_indices)
    h, w = mask_256.shape
    x_min = max(0, x_min - bbox_shift)
    x_max = min(w, x_max + bbox_shift)          # the reference's 256 (not 255) clip
    y_min = max(0, y_min - bbox_shift)
    y_max = min(h, y_max + bbox_shift)
    return np.array([x_min, y_min, x_max, y_max])


@torch.no_grad()
def medsam_logits(model, embedding, box_256) -> np.ndarray:
    """One box's (1, 256, 256) low-resolution logits, single-mask output."""
    box_torch = torch.as_tensor(box_256[None, None, ...], dtype=torch.float)
    sparse, dense = model.prompt_encoder(points=None, boxes=box_torch, masks=None)
    logits, _ = model.mask_decoder(image_embeddings=embedding,
                                   image_pe=model.prompt_encoder.get_dense_pe(),
                                   sparse_prompt_embeddings=sparse,
                                   dense_prompt_embeddings=dense, multimask_output=False)
    return logits[:, 0].numpy()


@torch.no_grad()
def postprocess_reference(logits: np.ndarray, new_size, original_size) -> np.ndarray:
    """The script's post-processing of one box: (1, 256, 256) logits -> (H, W) uint8 mask:
    crop to new_size, bilinear (align_corners=False) to original_size, sigmoid > 0.5."""
    cropped = torch.from_numpy(np.asarray(logits, np.float32))[None, :, :new_size[0],
                                                               :new_size[1]]
    resized = F.interpolate(cropped, size=original_size, mode="bilinear", align_corners=False)
    return (torch.sigmoid(resized) > 0.5).squeeze().cpu().numpy().astype(np.uint8)


@torch.no_grad()
def medsam_inference(model, embedding, box_256, new_size, original_size) -> np.ndarray:
    return postprocess_reference(medsam_logits(model, embedding, box_256), new_size,
                                 original_size)


@torch.no_grad()
def infer_2d(model, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    tensor, new_hw = image_tensor(image)
    embedding = model.image_encoder(tensor)
    segs = np.zeros((h, w), np.uint8)
    for index, box in enumerate(boxes, start=1):
        box256 = resize_box_to_256(box, original_size=(h, w))
        mask = medsam_inference(model, embedding, box256, new_hw, (h, w))
        segs[mask > 0] = index
    return segs


@torch.no_grad()
def infer_3d(model, volume: np.ndarray, boxes: np.ndarray, original_script: bool = False
             ) -> np.ndarray:
    """The updated script (embedding cache, downward bound max(-1, z_min - 1)).

    ``original_script``: the original (paper-timed) script instead: every slice is
    encoded again inside the per-box loops, and the downward bound is max(0, z_min - 1) (slice
    0 is never segmented). For benchmarks.
    """
    depth, h, w = volume.shape
    segs = np.zeros_like(volume, dtype=np.uint8)
    z_lo, z_hi = int(boxes[:, 2].min()), int(boxes[:, 5].max())
    embeddings, new_hw = {}, None

    def encode(z):
        nonlocal new_hw
        tensor, new_hw = image_tensor(np.repeat(volume[z][:, :, None], 3, axis=-1))
        return model.image_encoder(tensor)

    if original_script:
        embeddings = _EncodeEveryTime(encode)
    else:
        for z in range(z_lo, min(z_hi, depth - 1) + 1):
            embeddings[z] = encode(z)
    lowest = 0 if original_script else -1
    for index, box3d in enumerate(boxes, start=1):
        temp = np.zeros_like(volume, dtype=np.uint8)
        box2d = box3d[[0, 1, 3, 4]]
        z_min, z_max = int(box3d[2]), int(box3d[5])
        z_middle = int((z_max - z_min) / 2 + z_min)
        box_middle = resize_box_to_256(box2d, (h, w))
        for z in range(z_middle, min(z_max, depth - 1) + 1):
            if z == z_middle:
                box256 = box_middle
            else:
                previous = resize_longest_side(temp[z - 1], 256)
                box256 = get_bbox256(pad_image(previous)) if np.max(previous) > 0 else box_middle
            temp[z][medsam_inference(model, embeddings[z], box256, new_hw, (h, w)) > 0] = index
        for z in range(z_middle - 1, max(lowest, z_min - 1), -1):
            previous = resize_longest_side(temp[z + 1], 256)
            box256 = get_bbox256(pad_image(previous)) if np.max(previous) > 0 else box_middle
            temp[z][medsam_inference(model, embeddings[z], box256, new_hw, (h, w)) > 0] = index
        segs[temp > 0] = index
    return segs


class _EncodeEveryTime:
    """``embeddings[z]`` that runs the encoder on every lookup (the original script)."""

    def __init__(self, encode):
        self._encode = encode

    def __getitem__(self, z: int):
        return self._encode(z)
