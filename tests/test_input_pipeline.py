"""Input pipeline on built-in phantom data: build, read back, splits, determinism, resumption
(build and iteration), bad input, and the challenge preprocessing through the whole path.

Expected values come from the raw case files read here with NumPy / OpenCV / nibabel directly
(the authors' scripts resize with OpenCV INTER_AREA / INTER_NEAREST), or by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest

from input_pipeline.augment import FINETUNE_AUGMENT
from input_pipeline.augment import box_from_mask
from input_pipeline.examples import slice_objects, student_image
from input_pipeline.loader import (make_loader, prepare_example, restore_iterator,
                                   save_iterator_state)
from input_pipeline.phantoms import MNI152_NAME, mni152_case, write_phantom_dataset
from input_pipeline.sources import DuplicateCaseError, discover_sources
from input_pipeline.tfds_builder import (BuildError, BuildOptions, assign_splits, build_dataset,
                                         open_split, read_record_index)
from rep_medsam_jax.preprocess import preprocess_image

OPTIONS = BuildOptions(validation_fraction=0.3, split_seed=0)
REPO = Path(__file__).resolve().parents[1]


def _write_phantoms(folder: Path) -> Path:
    write_phantom_dataset(folder, n2d=6, n3d=2, seed=0, size_2d=(48, 64), shape_3d=(6, 40, 48))
    return folder


def _quiet(_message: str) -> None:
    pass


def _all_records(dataset_dir: Path) -> dict[str, list[dict]]:
    result = {}
    for split in ("train", "validation"):
        source = open_split(dataset_dir, split)
        result[split] = [source[i] for i in range(len(source))]
    return result


def _load_case(source_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(source_dir / "inputs" / f"{name}.npz") as f:
        imgs = f["imgs"]
    with np.load(source_dir / "gts" / f"{name}.npz") as f:
        gts = f["gts"]
    return imgs, gts


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    source = _write_phantoms(root / "cases")
    result = build_dataset(source, root / "data", OPTIONS, log=_quiet)
    return source, result


# --------------------------------------------------------------------------------------------
# Build and read back
# --------------------------------------------------------------------------------------------

def test_every_foreground_slice_is_one_record_holding_all_its_objects(built):
    source, result = built
    records = _all_records(result.dataset_dir)
    slices = [(r["case_id"].decode(), int(r["slice_index"]))
              for split in records.values() for r in split]
    found = {(r["case_id"].decode(), int(r["slice_index"]), int(v))
             for split in records.values() for r in split for v in slice_objects(r["labels"])}
    expected_slices, expected = set(), set()
    for path in sorted((source / "inputs").glob("*.npz")):
        _, gts = _load_case(source, path.stem)
        volume = gts if gts.ndim == 3 else gts[None]
        for z, labels in enumerate(volume):
            expected |= {(path.stem, z, int(v)) for v in np.unique(labels) if v}
            if labels.any():
                expected_slices.add((path.stem, z))
    assert len(slices) == len(set(slices)) and set(slices) == expected_slices   # each once
    assert found == expected
    assert all(int(r["num_objects"]) == len(slice_objects(r["labels"]))
               for split in records.values() for r in split)
    assert sum(result.split_sizes.values()) == len(expected_slices)
    assert sum(result.object_counts.values()) == len(expected)
    assert not result.skipped


def test_records_hold_the_spec_preprocessing_of_their_slice(built):
    """image = INTER_AREA resize (longest side 256, int(x+0.5)), padded; labels = nearest
    resize, padded; each object's mask = labels == k, box = its tight box; student_image ==
    preprocess_image(slice)."""
    source, result = built
    records = [r for split in _all_records(result.dataset_dir).values() for r in split]
    for record in records[::3]:
        imgs, gts = _load_case(source, record["case_id"].decode())
        z = int(record["slice_index"])
        is_3d = gts.ndim == 3
        rgb = np.repeat(imgs[z][..., None], 3, -1) if is_3d else imgs
        labels = gts[z] if is_3d else gts
        height, width = labels.shape
        newh, neww = int(height * 256 / max(height, width) + 0.5), int(width * 256 / max(
            height, width) + 0.5)
        assert tuple(record["image_hw"]) == (newh, neww)
        area = cv2.resize(rgb, (neww, newh), interpolation=cv2.INTER_AREA)
        assert np.array_equal(record["image"][:newh, :neww], area)
        assert not record["image"][newh:].any() and not record["image"][:, neww:].any()
        nearest = cv2.resize(labels, (neww, newh), interpolation=cv2.INTER_NEAREST)
        expected_labels = np.zeros((256, 256), np.uint16)
        expected_labels[:newh, :neww] = nearest
        assert np.array_equal(record["labels"], expected_labels)
        for value in slice_objects(expected_labels):
            example = prepare_example(dict(record, label=value, index=np.int64(0)))
            expected_mask = (expected_labels == value).astype(np.uint8)
            assert np.array_equal(example["mask"], expected_mask)
            rows, cols = np.nonzero(expected_mask)
            assert example["box"].tolist() == [cols.min(), rows.min(), cols.max(), rows.max()]
        # Training and inference turn the same slice into the same tensor, bit for bit.
        expected_image, expected_hw = preprocess_image(rgb)
        assert expected_hw == (newh, neww)
        assert np.array_equal(student_image(record["image"], record["image_hw"]),
                              expected_image)
        assert record["modality"].decode() == record["case_id"].decode().split("_")[1]


def test_splits_are_disjoint_by_case_and_the_record_index_matches(built):
    _, result = built
    records = _all_records(result.dataset_dir)
    cases = {split: {r["case_id"].decode() for r in rs} for split, rs in records.items()}
    assert cases["train"] and cases["validation"]
    assert not cases["train"] & cases["validation"]
    assert len(cases["train"] | cases["validation"]) == 8
    for split, rs in records.items():
        index = read_record_index(result.dataset_dir, split)
        assert [index["case_ids"][c] for c in index["case"]] == [
            r["case_id"].decode() for r in rs]
        assert index["slice_index"].tolist() == [int(r["slice_index"]) for r in rs]
        assert list(zip(index["object_record"].tolist(), index["object_label"].tolist())) == [
            (i, int(v)) for i, r in enumerate(rs) for v in slice_objects(r["labels"])]
        assert [index["case_modality"][c] for c in index["case"]] == [
            r["modality"].decode() for r in rs]


def test_split_assignment_is_seeded_stable_and_keeps_one_case_per_side():
    ids = [f"case{i:02d}" for i in range(20)]
    split = assign_splits(ids, 0.25, seed=3)
    assert len(split["validation"]) == 5 and not set(split["train"]) & set(split["validation"])
    assert split == assign_splits(list(reversed(ids)), 0.25, seed=3)
    assert split != assign_splits(ids, 0.25, seed=4)
    # Adding a case moves at most one other case across (the ranking is per case).
    grown = assign_splits(ids + ["case99"], 0.25, seed=3)
    assert set(grown["validation"]) <= set(split["validation"]) | {"case99"}
    assert len(set(split["validation"]) - set(grown["validation"])) <= 1
    assert assign_splits(["a", "b"], 0.01, 0)["validation"] and assign_splits(["a"], 0.5, 0) == {
        "train": ["a"], "validation": []}


def test_build_is_deterministic(built, tmp_path):
    source, first = built
    second = build_dataset(source, tmp_path / "again", OPTIONS, log=_quiet)
    a, b = _all_records(first.dataset_dir), _all_records(second.dataset_dir)
    for split in ("train", "validation"):
        assert len(a[split]) == len(b[split])
        for x, y in zip(a[split], b[split]):
            assert x.keys() == y.keys()
            assert all(np.array_equal(x[k], y[k]) for k in x)


def test_an_existing_dataset_is_reused_and_other_options_are_refused(built):
    source, result = built
    lines = []
    again = build_dataset(source, result.dataset_dir.parents[2], OPTIONS, log=lines.append)
    assert again.reused_existing and again.split_sizes == result.split_sizes
    with pytest.raises(BuildError, match="other options"):
        build_dataset(source, result.dataset_dir.parents[2],
                      BuildOptions(validation_fraction=0.5), log=_quiet)


# --------------------------------------------------------------------------------------------
# Resumption of an interrupted build
# --------------------------------------------------------------------------------------------

class _Interrupt(KeyboardInterrupt):
    pass


def test_an_interrupted_build_resumes_without_redoing_finished_cases(built, tmp_path):
    source, reference = built
    data_dir = tmp_path / "data"
    done = []

    def stop_after_three(report):
        done.append(report.case_id)
        if len(done) == 3:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        build_dataset(source, data_dir, OPTIONS, on_case_done=stop_after_three, log=_quiet)
    version_dir = data_dir / "med_sam_slices" / "size256" / "2.0.0"
    assert not version_dir.exists()
    cached = sorted(p.stem for p in (data_dir / "med_sam_slices_work" / "size256" / "cases")
                    .glob("*.npz"))
    assert cached == sorted(done)
    # A kill in stage 2 leaves tfds' temporary folder behind; a later build removes it.
    stale = version_dir.parent / "incomplete.ABC123_2.0.0"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("half written")
    # A kill in stage 1 leaves the temporary of the work file being written; it goes too.
    partial = data_dir / "med_sam_slices_work" / "size256" / "cases" / ".tmp-0123ab-x.npz"
    partial.write_bytes(b"half written")

    lines = []
    resumed = build_dataset(source, data_dir, OPTIONS, log=lines.append)
    statuses = {r.case_id: r.status for r in resumed.reports}
    assert {c for c, s in statuses.items() if s == "reused"} == set(done)
    assert {c for c, s in statuses.items() if s == "built"} == set(statuses) - set(done)
    assert not stale.exists() and not partial.exists()
    assert any("[1/8]" in line for line in lines)          # progress is reported per case
    a, b = _all_records(reference.dataset_dir), _all_records(resumed.dataset_dir)
    for split in a:
        assert [r["case_id"] for r in a[split]] == [r["case_id"] for r in b[split]]
        assert all(np.array_equal(x["labels"], y["labels"]) for x, y in zip(a[split], b[split]))


# --------------------------------------------------------------------------------------------
# Bad input: each case reported clearly, the rest built
# --------------------------------------------------------------------------------------------

def _save(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def test_bad_cases_are_reported_and_the_good_ones_built(tmp_path):
    source = tmp_path / "cases"
    write_phantom_dataset(source, n2d=2, n3d=1, seed=1, size_2d=32, shape_3d=(4, 32, 32))
    inputs, gts_dir = source / "inputs", source / "gts"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    labels = np.zeros((16, 16), np.uint8)
    labels[4:9, 5:12] = 1

    def case(name, gts=labels, **arrays):
        _save(inputs / f"{name}.npz", **arrays)
        if gts is not None:
            _save(gts_dir / f"{name}.npz", gts=gts)

    case("2DBox_CT_noimgs", boxes=np.array([[5, 4, 11, 8]]))
    volume = rng.integers(0, 256, (3, 16, 16)).astype(np.uint8)
    volume_labels = np.zeros((3, 16, 16), np.uint8)
    volume_labels[1, 2:6, 2:6] = 1
    case("3DBox_CT_boxpast", gts=volume_labels, imgs=volume,
         boxes=np.array([[2, 2, 1, 5, 5, 3]]))                 # z_max 3 = D: past the volume
    case("2DBox_CT_emptymask", gts=np.zeros((16, 16), np.uint8), imgs=image)
    nan_image = image.astype(np.float32)
    nan_image[3, 3, 0] = np.nan
    case("2DBox_CT_nan", imgs=nan_image)
    case("2DBox_CT_constant", imgs=np.full((16, 16, 3), 7, np.uint8))
    case("2DBox_CT_fraction", imgs=image.astype(np.float64) / 255.0)
    case("2DBox_CT_negative", imgs=image.astype(np.int16) - 100)
    case("2DBox_CT_nogts", gts=None, imgs=image)
    case("2DBox_CT_wrongshape", gts=labels[:8], imgs=image)
    (inputs / "2DBox_CT_corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    expected = {
        "2DBox_CT_noimgs": ("MissingKeyError", "missing key 'imgs'"),
        "3DBox_CT_boxpast": ("BoxOutOfBoundsError", "outside the image"),
        "2DBox_CT_emptymask": ("EmptyLabelsError", "all background"),
        "2DBox_CT_nan": ("NonFiniteImageError", "NaN"),
        "2DBox_CT_constant": ("ConstantImageError", "constant"),
        "2DBox_CT_fraction": ("ImageDtypeError", "non-integer"),
        "2DBox_CT_negative": ("ImageDtypeError", "outside uint8"),
        "2DBox_CT_nogts": ("MissingLabelsError", "no ground truth"),
        "2DBox_CT_wrongshape": ("LabelMapError", "does not match"),
        "2DBox_CT_corrupt": ("CaseReadError", "cannot read"),
    }
    lines = []
    result = build_dataset(source, tmp_path / "data", BuildOptions(validation_fraction=0.0),
                           log=lines.append)
    skipped = {r.case_id: r for r in result.skipped}
    assert set(skipped) == set(expected)
    for name, (error_type, words) in expected.items():
        assert skipped[name].error_type == error_type, (name, skipped[name].message)
        assert words in skipped[name].message and name in skipped[name].message
        assert any(name in line and "SKIPPED" in line for line in lines)
    built_cases = {r["case_id"].decode() for r in _all_records_train(result.dataset_dir)}
    assert built_cases == {"2DBox_CT_0000", "2DBox_MR_0001", "3DBox_CT_0000"}
    report = json.loads((result.dataset_dir / "build_report.json").read_text())
    assert {c["case_id"] for c in report["cases"] if c["status"] == "skipped"} == set(expected)


def _all_records_train(dataset_dir: Path) -> list[dict]:
    source = open_split(dataset_dir, "train")
    return [source[i] for i in range(len(source))]


# --------------------------------------------------------------------------------------------
# Preprocessing on hand-made inputs: rounding, CT window, percentiles, NIfTI pairs
# --------------------------------------------------------------------------------------------

def test_resize_rounds_half_up_and_only_foreground_slices_are_kept(tmp_path):
    # H = 3, W = 7: 3 * 256 / 7 = 109.71 -> int(x + 0.5) = 110 (truncation would give 109).
    image = np.arange(63, dtype=np.uint8).reshape(3, 7, 3) * 4
    labels = np.zeros((3, 7), np.uint8)
    labels[1, 2:5] = 3
    _save(tmp_path / "cases" / "2DBox_Tiny_0.npz", imgs=image, gts=labels)
    volume = np.random.default_rng(1).integers(0, 256, (5, 8, 8)).astype(np.uint8)
    volume_labels = np.zeros((5, 8, 8), np.uint8)
    volume_labels[1, 2:4, 2:4] = 1
    volume_labels[3, 4:7, 1:3] = 2
    _save(tmp_path / "cases" / "3DBox_MR_0.npz", imgs=volume, gts=volume_labels)
    result = build_dataset(tmp_path / "cases", tmp_path / "data",
                           BuildOptions(validation_fraction=0.0), log=_quiet)
    records = _all_records_train(result.dataset_dir)
    tiny = [r for r in records if r["case_id"] == b"2DBox_Tiny_0"]
    assert len(tiny) == 1 and tuple(tiny[0]["image_hw"]) == (110, 256)
    assert slice_objects(tiny[0]["labels"]).tolist() == [3]
    volume_records = [(int(r["slice_index"]), int(v)) for r in records
                      if r["case_id"] == b"3DBox_MR_0" for v in slice_objects(r["labels"])]
    assert volume_records == [(1, 1), (3, 2)]


def test_discovery_of_npz_and_nifti_layouts(tmp_path):
    for name in ("a_0000", "a_0001", "case_0001", "b", "c_0000"):
        (tmp_path / "imagesTr").mkdir(exist_ok=True)
        (tmp_path / "imagesTr" / f"{name}.nii.gz").write_bytes(b"")
    for name in ("a", "case_0001", "b"):
        (tmp_path / "labelsTr").mkdir(exist_ok=True)
        (tmp_path / "labelsTr" / f"{name}.nii.gz").write_bytes(b"")
    _save(tmp_path / "2DBox_US_x.npz", imgs=np.zeros((2, 2, 3), np.uint8))     # gts inside
    _save(tmp_path / "inputs" / "3DBox_CT_y.npz", imgs=np.zeros((1, 2, 2), np.uint8))
    _save(tmp_path / "gts" / "3DBox_CT_y.npz", gts=np.zeros((1, 2, 2), np.uint8))
    (tmp_path / "inputs" / ".tmp-123-3DBox_CT_z.npz").write_bytes(b"")        # hidden: ignored
    found = {s.case_id: (s.kind, s.image_path.name, s.label_path and s.label_path.name)
             for s in discover_sources(tmp_path)}
    assert found == {
        "a": ("nifti", "a_0000.nii.gz", "a.nii.gz"),          # nnU-Net channel 0; _0001 unused
        "b": ("nifti", "b.nii.gz", "b.nii.gz"),
        "case_0001": ("nifti", "case_0001.nii.gz", "case_0001.nii.gz"),   # not a channel
        "c_0000": ("nifti", "c_0000.nii.gz", None),            # no labels: reported at build
        "2DBox_US_x": ("npz", "2DBox_US_x.npz", None),
        "3DBox_CT_y": ("npz", "3DBox_CT_y.npz", "3DBox_CT_y.npz"),
    }
    _save(tmp_path / "inputs" / "2DBox_US_x.npz", imgs=np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DuplicateCaseError, match="2DBox_US_x"):
        discover_sources(tmp_path)


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


LPS = np.diag([-1.0, -1.0, 1.0, 1.0])     # stored axes already LPS: no reorientation


def test_nifti_ct_pairs_use_the_window_by_hand(tmp_path):
    """Stored (X, Y, Z) = (256, 256, 2) HU; window 40/400 -> [-160, 240] -> (v + 160) / 400 * 255
    truncated, hand values: -1000 -> 0, 0 -> 102, 40 -> 127, 240 -> 255, 1000 -> 255."""
    root = tmp_path / "nifti"
    hu = np.full((256, 256, 2), -1000.0)
    hu[10:20, 30:50, 0] = 0.0
    hu[100:120, 40:60, 0] = 40.0
    hu[200:210, 5:9, 0] = 240.0
    hu[0:5, 0:5, 0] = 1000.0
    labels = np.zeros((256, 256, 2), np.uint8)
    labels[100:120, 40:60, 0] = 1
    _nifti(root / "imagesTr" / "liver_001_0000.nii.gz", hu.astype(np.float32), LPS)
    _nifti(root / "labelsTr" / "liver_001.nii.gz", labels, LPS)
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}}))
    # A pair whose label volume lies on another grid is reported, not used.
    _nifti(root / "imagesTr" / "liver_002_0000.nii.gz", hu.astype(np.float32), LPS)
    _nifti(root / "labelsTr" / "liver_002.nii.gz", labels, np.diag([-2.0, -1.0, 1.0, 1.0]))
    result = build_dataset(root, tmp_path / "data", BuildOptions(validation_fraction=0.0),
                           log=_quiet)
    assert [(r.case_id, r.error_type) for r in result.skipped] == [("liver_002",
                                                                    "LabelMapError")]
    (record,) = _all_records_train(result.dataset_dir)
    assert record["case_id"] == b"liver_001" and record["modality"] == b"CT"
    expected = np.zeros((256, 256), np.uint8)          # (H, W) = (y, x): transpose of (x, y)
    expected[30:50, 10:20] = 102
    expected[40:60, 100:120] = 127
    expected[5:9, 200:210] = 255
    expected[0:5, 0:5] = 255
    assert tuple(record["image_hw"]) == (256, 256)
    for channel in range(3):
        assert np.array_equal(record["image"][..., channel], expected)
    assert box_from_mask(record["labels"] == 1).tolist() == [100, 40, 119, 59]


def test_nifti_mr_uses_percentiles_of_positive_voxels_and_keeps_zeros(tmp_path):
    root = tmp_path / "nifti"
    values = np.zeros((16, 16, 1))
    values[2:14, 2:14, 0] = np.arange(1, 145).reshape(12, 12)     # 1..144
    labels = np.zeros((16, 16, 1), np.uint8)
    labels[4:8, 4:8, 0] = 2
    _nifti(root / "images" / "brain.nii.gz", values.astype(np.float32), LPS)
    _nifti(root / "labels" / "brain.nii.gz", labels, LPS)
    (root / "images" / "brain.json").write_text(json.dumps({"modality": "MR"}))
    result = build_dataset(root, tmp_path / "data", BuildOptions(validation_fraction=0.0,
                                                                 image_size=16), log=_quiet)
    (record,) = _all_records_train(result.dataset_dir)
    positive = np.arange(1, 145, dtype=np.float64)
    low, high = np.percentile(positive, 0.5), np.percentile(positive, 99.5)
    clipped = np.clip(values[..., 0], low, high)
    expected = ((clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255).astype(np.uint8)
    expected[values[..., 0] == 0] = 0
    assert record["modality"] == b"MR"
    assert np.array_equal(record["image"][..., 0], expected.T)


def test_real_anatomy_mni152_builds_into_white_and_grey_matter_examples(tmp_path):
    case = mni152_case(tmp_path / "cases", downsample=4)        # ships with nilearn: offline
    result = build_dataset(tmp_path / "cases", tmp_path / "data",
                           BuildOptions(validation_fraction=0.0), log=_quiet)
    records = _all_records_train(result.dataset_dir)
    assert {r["case_id"] for r in records} == {MNI152_NAME.encode()}
    assert {r["modality"] for r in records} == {b"MR"}
    expected = {(z, int(v)) for z, labels in enumerate(case.gts) for v in np.unique(labels) if v}
    assert {(int(r["slice_index"]), int(v)) for r in records
            for v in slice_objects(r["labels"])} == expected


# --------------------------------------------------------------------------------------------
# Loader: determinism, sharding, exact resumption
# --------------------------------------------------------------------------------------------

def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _same_batches(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_loader_is_deterministic_under_a_seed(built):
    _, result = built

    def make(seed):
        return make_loader(result.dataset_dir, "train", batch_size=4, seed=seed,
                           augment=FINETUNE_AUGMENT)

    first, second = _take(iter(make(5)), 3), _take(iter(make(5)), 3)
    assert _same_batches(first, second)
    other = _take(iter(make(6)), 3)
    assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(first, other))
    batch = first[0]
    assert batch["image"].shape == (4, 256, 256, 3) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (4, 256, 256) and batch["box"].shape == (4, 4)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_loader_without_augmentation_gives_the_stored_examples_normalised(built):
    _, result = built
    source = open_split(result.dataset_dir, "train")
    batch = next(iter(make_loader(result.dataset_dir, "train", batch_size=3, shuffle=False,
                                  augment=None)))
    for row, index in enumerate(batch["index"]):
        record = source[int(index)]
        assert np.array_equal(batch["image"][row],
                              student_image(record["image"], record["image_hw"]))
        mask = record["labels"] == batch["label"][row]
        assert np.array_equal(batch["mask"][row], mask)
        assert np.array_equal(batch["box"][row], box_from_mask(mask))
    assert batch["index"].tolist() == [0, 1, 2]


def _epoch(loader) -> list[tuple[int, int]]:
    return [(int(i), int(k)) for b in loader for i, k in zip(b["index"], b["label"])]


def test_slice_sampling_shows_every_slice_once_per_epoch_with_one_drawn_object(built):
    """Epoch e of a seeded stream = one pass over the slices; each slice's object is drawn
    uniformly from its own objects, independently each epoch."""
    _, result = built
    source = open_split(result.dataset_dir, "train")
    objects = [set(slice_objects(source[i]["labels"]).tolist()) for i in range(len(source))]
    multi = [i for i, o in enumerate(objects) if len(o) > 1]
    assert multi, "the phantoms must have slices with several objects"
    epochs = 40
    loader = make_loader(result.dataset_dir, "train", batch_size=1, seed=2, num_epochs=epochs,
                         drop_remainder=False)
    stream = _epoch(loader)
    assert len(stream) == epochs * len(source)
    draws = {i: [] for i in range(len(source))}
    for e in range(epochs):
        epoch = stream[e * len(source):(e + 1) * len(source)]
        assert sorted(i for i, _ in epoch) == list(range(len(source)))   # every slice once
        for i, k in epoch:
            assert k in objects[i]
            draws[i].append(k)
    # Uniform: Pearson's chi-square of the draw counts against equal counts, pooled over the
    # slices with several objects (df = sum of (n - 1)). A rule such as "always the first /
    # the largest object" gives p ~ 0; a uniform draw fails this 1 time in 10^4.
    from scipy.stats import chi2  # noqa: PLC0415

    statistic, dof = 0.0, 0
    for i in multi:
        counts = np.array([draws[i].count(k) for k in sorted(objects[i])], float)
        statistic += float(((counts - epochs / counts.size) ** 2).sum() / (epochs / counts.size))
        dof += counts.size - 1
    assert chi2.sf(statistic, dof) > 1e-4, (statistic, dof)


def test_object_sampling_shows_every_object_once_per_epoch(built):
    _, result = built
    index = read_record_index(result.dataset_dir, "train")
    expected = sorted(zip(index["object_record"].tolist(), index["object_label"].tolist()))
    loader = make_loader(result.dataset_dir, "train", batch_size=1, seed=2, num_epochs=1,
                         drop_remainder=False, sampling="object")
    assert sorted(_epoch(loader)) == expected
    assert len(expected) == result.object_counts["train"] > result.split_sizes["train"]


def test_hosts_read_disjoint_equal_shares(built):
    _, result = built
    total = result.split_sizes["train"]
    shares = []
    for host in range(2):
        loader = make_loader(result.dataset_dir, "train", batch_size=1, seed=0, num_epochs=1,
                             process_index=host, process_count=2)
        shares.append({int(b["index"][0]) for b in loader})
    assert not shares[0] & shares[1]
    assert len(shares[0]) == len(shares[1]) == total // 2


def test_iteration_resumes_exactly_from_a_saved_state(built, tmp_path):
    _, result = built
    make = lambda: make_loader(result.dataset_dir, "train", batch_size=3, seed=11,  # noqa: E731
                               augment=FINETUNE_AUGMENT)
    iterator = iter(make())
    _take(iterator, 4)
    save_iterator_state(iterator, tmp_path / "state")
    expected = _take(iterator, 3)
    resumed = restore_iterator(make(), tmp_path / "state")        # e.g. after a restart
    assert _same_batches(_take(resumed, 3), expected)


def test_a_moved_dataset_resumes_from_a_saved_state(built, tmp_path):
    """The iterator state names the dataset, not its absolute path: a copy in another folder
    (a moved WORKDIR, another mount point) continues the same stream."""
    import shutil

    _, result = built
    moved = tmp_path / "elsewhere" / Path(result.dataset_dir).relative_to(
        Path(result.dataset_dir).parents[2])
    shutil.copytree(result.dataset_dir, moved)

    def make(dataset_dir):
        return make_loader(dataset_dir, "train", batch_size=3, seed=11, augment=FINETUNE_AUGMENT)

    iterator = iter(make(result.dataset_dir))
    _take(iterator, 2)
    save_iterator_state(iterator, tmp_path / "state")
    expected = _take(iterator, 2)
    resumed = restore_iterator(make(moved), tmp_path / "state")
    assert _same_batches(_take(resumed, 2), expected)


@pytest.mark.slow
def test_iteration_with_worker_processes_resumes_exactly(built, tmp_path):
    _, result = built
    make = lambda: make_loader(result.dataset_dir, "train", batch_size=2, seed=3,  # noqa: E731
                               augment=FINETUNE_AUGMENT, worker_count=2)
    iterator = iter(make())
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 2)
    resumed = iter(make())
    resumed.set_state(state)
    assert _same_batches(_take(resumed, 2), expected)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def test_build_command_on_phantoms(tmp_path):
    command = [sys.executable, "-m", "input_pipeline.build", "--phantoms", "2", "0",
               "--data-dir", str(tmp_path), "--validation-fraction", "0.5"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("dataset: ")]
    dataset_dir = Path(line.removeprefix("dataset: "))
    assert (dataset_dir / "build_report.json").is_file()
    assert "[2/2] 2DBox_MR_0001" in run.stderr
    bad = subprocess.run([sys.executable, "-m", "input_pipeline.build", "--source",
                          str(tmp_path / "missing"), "--data-dir", str(tmp_path / "x")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "does not exist" in bad.stderr
