"""Parity on an accelerator: the converted full-size Rep-MedSAM in JAX on the default device
(a GPU where JAX has one) against the PyTorch reference model with the same weights.

    python benchmarks/gpu_parity.py [--boxes 4] [--json FILE]

A randomly initialised PyTorch reference (``tests/reference/medsam_lite_torch.py``:
Rep-MedSAM's RepViT + segment-anything's heads, non-trivial BatchNorm statistics) is converted with
``convert_state_dict``; one 256 x 256 image and ``--boxes`` boxes go through

* PyTorch float32 on the CPU (the reference), and on CUDA if torch has it;
* JAX on the CPU, and on the default device with ``jax_default_matmul_precision`` left at the
  default (on NVIDIA GPUs XLA may then use TF32 for float32 convolutions and matmuls) and set to
  ``highest`` (true float32); the unfused and the folded (deploy) encoder.

Prints, per run, the max abs difference of the low-resolution mask logits and the IoU scores
against the PyTorch CPU reference, and the fraction of low-resolution mask pixels (logit > 0)
that agree. No assertion: a report for the docs (the CPU parity is asserted by the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rep_medsam_jax.convert.checkpoints import convert_state_dict  # noqa: E402
from rep_medsam_jax.models.config import REPVIT_VARIANTS  # noqa: E402
from rep_medsam_jax.models.folding import fold  # noqa: E402
from rep_medsam_jax.models.medsam_lite import build_model  # noqa: E402
from record import add_out_argument, resolve_out, write_json  # noqa: E402


def _inputs(n_boxes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.random((1, 256, 256, 3), np.float32)
    x0y0 = rng.uniform(0, 150, (n_boxes, 2))
    boxes = np.concatenate([x0y0, x0y0 + rng.uniform(20, 100, (n_boxes, 2))], 1)
    return image, boxes.astype(np.float32)


def torch_outputs(model, image, boxes, device: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    model = model.to(device)
    with torch.no_grad():
        x = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous().to(device)
        embedding = model.image_encoder(x)
        sparse, dense = model.prompt_encoder(points=None,
                                             boxes=torch.from_numpy(boxes)[:, None].to(device),
                                             masks=None)
        logits, iou = model.mask_decoder(image_embeddings=embedding,
                                         image_pe=model.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse,
                                         dense_prompt_embeddings=dense, multimask_output=False)
    return logits[:, 0].cpu().numpy(), iou[:, 0].cpu().numpy()


def jax_outputs(config, variables, image, boxes, device, precision: str | None
                ) -> tuple[np.ndarray, np.ndarray]:
    model = build_model(config)

    def forward(variables, image, boxes):
        embedding, _ = model.apply(variables, image, method=model.encode)
        logits, iou = model.apply(variables, embedding, boxes, method=model.decode)
        return logits[:, 0], iou[:, 0]

    with jax.default_device(device), jax.default_matmul_precision(precision or "default"):
        put = jax.device_put((variables, image, boxes), device)
        logits, iou = jax.jit(forward)(*put)
        return np.asarray(logits), np.asarray(iou)


def _compare(name, logits, iou, ref_logits, ref_iou) -> dict:
    agree = float(np.mean((logits > 0) == (ref_logits > 0)))
    row = {"run": name, "logits_max_abs": float(np.max(np.abs(logits - ref_logits))),
           "iou_max_abs": float(np.max(np.abs(iou - ref_iou))), "mask_pixel_agreement": agree}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, default=4)
    add_out_argument(parser, "gpu_parity", ".json", flag="--json")
    args = parser.parse_args()

    import torch

    from tests.reference.medsam_lite_torch import build_reference_model

    variant = REPVIT_VARIANTS["rep_medsam_m1_0"]
    reference = build_reference_model(variant.rows, seed=1)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    config, variables, _ = convert_state_dict(state, "rep-medsam")
    folded_config = dataclasses.replace(config, deployed=True)
    image, boxes = _inputs(args.boxes)
    ref_logits, ref_iou = torch_outputs(reference, image, boxes, "cpu")
    print(f"jax {jax.__version__} devices {jax.devices()}; torch {torch.__version__}",
          flush=True)
    rows = []
    if torch.cuda.is_available():
        logits, iou = torch_outputs(reference, image, boxes, "cuda")
        rows.append(_compare("torch cuda f32 (torch defaults)",
                             logits, iou, ref_logits, ref_iou))
    cpu = jax.devices("cpu")[0]
    default = jax.devices()[0]
    rows.append(_compare("jax cpu", *jax_outputs(config, variables, image, boxes, cpu, None),
                         ref_logits, ref_iou))
    if default.platform != "cpu":
        for precision in (None, "highest"):
            rows.append(_compare(f"jax {default.platform} precision={precision or 'default'}",
                                 *jax_outputs(config, variables, image, boxes, default,
                                              precision), ref_logits, ref_iou))
    encoder = {"params": variables["params"]["image_encoder"],
               "batch_stats": variables["batch_stats"]["image_encoder"]}
    folded = {"params": {**variables["params"],
                         "image_encoder": fold(encoder, variant)["params"]}}
    for precision in ((None, "highest") if default.platform != "cpu" else (None,)):
        rows.append(_compare(f"jax {default.platform} folded precision={precision or 'default'}",
                             *jax_outputs(folded_config, folded, image, boxes, default,
                                          precision), ref_logits, ref_iou))
    write_json(resolve_out(args.json, "gpu_parity", ".json"), rows)


if __name__ == "__main__":
    main()
