"""Our predictor (JAX backend, converted weights) vs a PyTorch reference pipeline (SPEC §6-§7).

The reference inference is written in tests/reference/medsam_lite_torch.py from the SPEC,
quirks included, and runs the BN-fused PyTorch model as ``CVPR24_LiteMedSAM_infer.py`` does.
"""

from __future__ import annotations

import numpy as np
import pytest

from input_pipeline.phantoms import make_case_2d, make_case_3d
from rep_medsam_jax.predictor.cases import predict_2d, predict_3d


def _per_label_dice(ours: np.ndarray, reference: np.ndarray, labels: int) -> list[float]:
    scores = []
    for label in range(1, labels + 1):
        a, b = ours == label, reference == label
        total = a.sum() + b.sum()
        scores.append(1.0 if total == 0 else 2 * np.logical_and(a, b).sum() / total)
    return scores


@pytest.fixture(scope="module")
def backends(torch_rep_medsam, converted_rep_medsam):
    from rep_medsam_jax.predictor.backend import open_backend
    from tests.reference.medsam_lite_torch import fused_copy

    return open_backend(converted_rep_medsam, "jax"), fused_copy(torch_rep_medsam[0])


@pytest.mark.slow
def test_2d_case_matches_the_pytorch_reference_pipeline(backends):
    from tests.reference.medsam_lite_torch import infer_2d

    jax_backend, torch_model = backends
    image, _, boxes = make_case_2d(np.random.default_rng(21), "Dermoscopy", (180, 230))
    ours, reference = predict_2d(jax_backend, image, boxes), infer_2d(torch_model, image, boxes)
    scores = _per_label_dice(ours, reference, len(boxes))
    print("2D per-label DSC vs reference:", np.round(scores, 5), "foreground px:",
          int((reference > 0).sum()))
    assert reference.any() and min(scores) >= 0.99


@pytest.mark.slow
def test_3d_case_matches_the_pytorch_reference_pipeline(backends):
    from tests.reference.medsam_lite_torch import infer_3d

    jax_backend, torch_model = backends
    volume, _, boxes, _ = make_case_3d(np.random.default_rng(7), "CT", (10, 90, 120))
    boxes = boxes[:2]
    ours, reference = predict_3d(jax_backend, volume, boxes), infer_3d(torch_model, volume, boxes)
    scores = _per_label_dice(ours, reference, len(boxes))
    print("3D per-label DSC vs reference:", np.round(scores, 5), "foreground voxels:",
          int((reference > 0).sum()))
    assert reference.any() and min(scores) >= 0.99
