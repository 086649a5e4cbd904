"""Training sources read through the inference format layer: same arrays, same sidecar rules.

Inputs are written with nibabel directly; the inference reader (``rep_medsam_jax.io.read_case``)
is the reference for what the model sees at prediction time.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from input_pipeline.sources import CaseSource, read_training_case
from rep_medsam_jax import io as rio

# An anisotropic grid whose stored axes 0 and 1 are swapped against LPS (axis 0 runs posterior,
# axis 1 to the patient's right): a reader that skipped the reorientation, or applied it to the
# image or the labels only, gives another array.
AFFINE = np.array([[0.0, 0.8, 0.0, 0.0], [-1.5, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _pair(folder, name, volume, labels, sidecar=None):
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    image_path = folder / "imagesTr" / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), image_path)
    nib.save(nib.Nifti1Image(labels, AFFINE), folder / "labelsTr" / f"{name}.nii.gz")
    if sidecar is not None:
        (folder / "imagesTr" / f"{name}.json").write_text(json.dumps(sidecar))
    return CaseSource(name, "nifti", image_path, folder / "labelsTr" / f"{name}.nii.gz")


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_a_training_volume_is_the_inference_volume(tmp_path, modality):
    rng = np.random.default_rng(3)
    volume = rng.normal(50, 300, (9, 7, 5)).astype(np.float32)
    labels = np.zeros((9, 7, 5), np.uint8)
    labels[2:6, 1:4, 1:3] = 1
    sidecar = {"modality": modality, "boxes": [[2, 1, 1, 5, 3, 2]]}
    case = read_training_case(_pair(tmp_path, "vol", volume, labels, sidecar))
    inference = rio.read_case(tmp_path / "imagesTr" / "vol.nii.gz")
    assert case.image.shape == (5, 9, 7)        # (D, H, W) = (z, y, x) = stored (2, 0, 1)
    np.testing.assert_array_equal(case.image, inference.image)
    # The labels follow the same reorientation: the box read by inference encloses them.
    x0, y0, z0, x1, y1, z1 = inference.boxes[0]
    assert case.labels[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1].sum() == case.labels.sum() == 24


def test_training_sidecars_follow_the_inference_schema(tmp_path):
    volume = np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    labels = np.zeros((4, 4, 3), np.uint8)
    labels[1:3, 1:3, 1] = 1
    # Boxes are optional for training: the modality alone is a valid sidecar.
    case = read_training_case(_pair(tmp_path / "ok", "a", volume, labels, {"modality": "MR"}))
    assert case.modality == "MR"
    for bad, words in (({"modality": "CT", "colour": "red"}, "unknown sidecar key"),
                       ({"modality": 3}, "'modality' must be a string"),
                       ({"modality": "CT", "ct_window": [40, 0]}, "width > 0")):
        source = _pair(tmp_path / "bad", "b", volume, labels, bad)
        with pytest.raises(rio.SidecarError, match=words):
            read_training_case(source)
