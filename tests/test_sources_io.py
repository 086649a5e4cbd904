"""Training sources read through the inference format layer: same arrays, same sidecar rules.

Inputs are written with nibabel directly; the inference reader (``rep_medsam_jax.io.read_case``)
is the reference for what the model sees at prediction time.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from input_pipeline.sources import (CaseSource, DuplicateCaseError, discover_sources,
                                    read_training_case)
from input_pipeline.tfds_builder import BuildOptions, build_dataset
from rep_medsam_jax import io as rio
from tests.phantom_data import write_nested_corpus

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


# --------------------------------------------------------------------------------------------
# Discovery in a nested corpus (the challenge's modality / dataset tree), several roots
# --------------------------------------------------------------------------------------------

def _npz(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _slice_case():
    image = np.zeros((8, 8, 3), np.uint8)
    image[2:6, 2:6] = 200
    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = 1
    return image, labels


def test_discovery_finds_cases_at_any_depth_under_several_roots(tmp_path):
    image, labels = _slice_case()
    one, two = tmp_path / "one", tmp_path / "two"
    # The training release: modality / dataset / case.npz, ground truth inside the file.
    _npz(one / "CT" / "AbdomenCT" / "CT_Abd_001.npz", imgs=image, gts=labels)
    _npz(one / "CT" / "AbdomenCT" / "CT_Abd_002.npz", imgs=image, gts=labels)
    _npz(one / "MR" / "Brain" / "part1" / "MR_Brain_7.npz", imgs=image, gts=labels)
    # The evaluation layout, nested: inputs/ + gts/ siblings, and gts/ inside the image folder.
    _npz(one / "eval" / "inputs" / "2DBox_US_a.npz", imgs=image)
    _npz(one / "eval" / "gts" / "2DBox_US_a.npz", gts=labels * 2)
    _npz(one / "X" / "Y" / "2DBox_XRay_b.npz", imgs=image)
    _npz(one / "X" / "Y" / "gts" / "2DBox_XRay_b.npz", gts=labels * 3)
    # A gts/ file that matches no image is a case of its own (and fails at build, no imgs).
    _npz(one / "X" / "gts" / "2DBox_XRay_orphan.npz", gts=labels)
    # Hidden files and folders are ignored.
    _npz(one / "CT" / ".cache" / "CT_hidden.npz", imgs=image, gts=labels)
    _npz(one / "CT" / "AbdomenCT" / ".CT_tmp.npz", imgs=image, gts=labels)
    # A NIfTI task folder deep in the second root, its modality from dataset.json.
    task = two / "nnunet" / "Dataset001_Liver"
    volume = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume, AFFINE), task / "imagesTr" / "liver_3_0000.nii.gz")
    nib.save(nib.Nifti1Image((volume > 60).astype(np.uint8), AFFINE),
             task / "labelsTr" / "liver_3.nii.gz")
    (task / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}}))

    sources = discover_sources([two, one])
    found = {s.case_id: (s.kind, s.image_path.relative_to(tmp_path).as_posix(),
                         s.label_path and s.label_path.relative_to(tmp_path).as_posix())
             for s in sources}
    assert found == {
        "CT_Abd_001": ("npz", "one/CT/AbdomenCT/CT_Abd_001.npz", None),
        "CT_Abd_002": ("npz", "one/CT/AbdomenCT/CT_Abd_002.npz", None),
        "MR_Brain_7": ("npz", "one/MR/Brain/part1/MR_Brain_7.npz", None),
        "2DBox_US_a": ("npz", "one/eval/inputs/2DBox_US_a.npz", "one/eval/gts/2DBox_US_a.npz"),
        "2DBox_XRay_b": ("npz", "one/X/Y/2DBox_XRay_b.npz", "one/X/Y/gts/2DBox_XRay_b.npz"),
        "2DBox_XRay_orphan": ("npz", "one/X/gts/2DBox_XRay_orphan.npz", None),
        "liver_3": ("nifti", "two/nnunet/Dataset001_Liver/imagesTr/liver_3_0000.nii.gz",
                    "two/nnunet/Dataset001_Liver/labelsTr/liver_3.nii.gz"),
    }
    assert [s.case_id for s in sources] == sorted(found)                 # sorted by id
    assert [s.case_id for s in discover_sources([one, two])] == sorted(found)
    assert discover_sources(one / "X" / "Y")[0].label_path is not None   # any root works
    # The pairing is the one the reader uses: label values come from the gts/ files.
    cases = {s.case_id: s for s in sources}
    assert read_training_case(cases["2DBox_US_a"]).labels.max() == 2
    assert read_training_case(cases["2DBox_XRay_b"]).labels.max() == 3
    assert read_training_case(cases["liver_3"]).modality == "MR"
    # A root given twice (or nested in another) finds each file once.
    assert len(discover_sources([one, one / "CT"])) == len(discover_sources(one))


def test_duplicate_case_ids_across_folders_name_both_files(tmp_path):
    image, labels = _slice_case()
    first = tmp_path / "a" / "CT" / "Set1" / "CT_case_1.npz"
    second = tmp_path / "b" / "MR" / "Set2" / "deeper" / "CT_case_1.npz"
    _npz(first, imgs=image, gts=labels)
    _npz(second, imgs=image, gts=labels)
    with pytest.raises(DuplicateCaseError) as caught:
        discover_sources(tmp_path)
    assert str(first) in str(caught.value) and str(second) in str(caught.value)
    with pytest.raises(DuplicateCaseError) as caught:      # across two roots
        discover_sources([tmp_path / "b", tmp_path / "a"])
    assert str(first) in str(caught.value) and str(second) in str(caught.value)
    with pytest.raises(NotADirectoryError, match="missing"):
        discover_sources([tmp_path / "a", tmp_path / "missing"])


def test_a_corrupt_file_deep_in_the_tree_is_named_and_skipped(tmp_path):
    root = tmp_path / "corpus"
    names = write_nested_corpus(root, tmp_path / "flat")
    corrupt = root / "CT" / "Broken" / "deep" / "CT_corrupt_01.npz"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"PK\x03\x04 not a zip archive")
    lines = []
    result = build_dataset(root, tmp_path / "data", BuildOptions(image_size=32,
                                                                 validation_fraction=0.0),
                           log=lines.append)
    (skipped,) = result.skipped
    assert skipped.case_id == "CT_corrupt_01" and str(corrupt) in skipped.message
    assert sorted(r.case_id for r in result.reports if r.ok) == sorted(names)
    report = json.loads((result.dataset_dir / "build_report.json").read_text())
    assert [c["case_id"] for c in report["cases"] if c["status"] == "skipped"] == [
        "CT_corrupt_01"]
    assert "skipped CT_corrupt_01" in lines[-1]           # the summary names it
