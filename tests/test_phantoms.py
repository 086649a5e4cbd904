"""Phantom generators and the MNI152 case: formats, box/label agreement, determinism, contrast."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from scipy import ndimage

from input_pipeline import phantoms
from rep_medsam_jax import io as rio


def _check_labels_and_boxes(gts: np.ndarray, boxes: np.ndarray, jitter: int = 0) -> None:
    """Labels are 1..K with K = number of boxes; box k is label k's bbox (tight, or enlarged by
    at most ``jitter`` in-plane), and lies inside the image."""
    count = len(boxes)
    assert count >= 1
    assert set(np.unique(gts)) == set(range(count + 1))
    is_3d = gts.ndim == 3
    for label, box in enumerate(boxes, start=1):
        coords = np.argwhere(gts == label)            # (n, ndim) in array axes
        tight_low, tight_high = coords.min(0)[::-1], coords.max(0)[::-1]   # -> x, y(, z)
        half = 3 if is_3d else 2
        low, high = box[:half], box[half:]
        assert np.all(low <= tight_low) and np.all(high >= tight_high)   # contains the object
        assert np.all(tight_low - low <= jitter) and np.all(high - tight_high <= jitter)
        if is_3d:                                      # z is never jittered
            assert low[2] == tight_low[2] and high[2] == tight_high[2]
        assert np.all(low >= 0) and np.all(high <= np.array(gts.shape[::-1]) - 1)


@pytest.mark.parametrize("modality", phantoms.MODALITIES_2D)
def test_2d_case_format_labels_and_boxes(modality):
    imgs, gts, boxes = phantoms.make_case_2d(np.random.default_rng(3), modality, (72, 96))
    assert imgs.shape == (72, 96, 3) and imgs.dtype == np.uint8
    assert gts.shape == (72, 96) and gts.dtype == np.uint8
    assert boxes.shape[1] == 4 and np.issubdtype(boxes.dtype, np.integer)
    _check_labels_and_boxes(gts, boxes)


@pytest.mark.parametrize("modality", phantoms.MODALITIES_3D)
def test_3d_case_format_labels_and_boxes(modality):
    imgs, gts, boxes, spacing = phantoms.make_case_3d(np.random.default_rng(4), modality,
                                                      (16, 64, 80))
    assert imgs.shape == gts.shape == (16, 64, 80)
    assert imgs.dtype == gts.dtype == np.uint8
    assert boxes.shape[1] == 6
    _check_labels_and_boxes(gts, boxes)
    assert spacing.shape == (3,) and spacing[0] == spacing[1] and spacing[2] > spacing[0]
    # Objects are round in physical space: they span several slices.
    assert all(box[5] - box[2] >= 1 for box in boxes)


def test_jittered_boxes_still_contain_their_objects():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        _, gts, boxes = phantoms.make_case_2d(rng, "CT", 64, box_jitter=4)
        _check_labels_and_boxes(gts, boxes, jitter=4)
        _, gts, boxes, _ = phantoms.make_case_3d(rng, "MR", (12, 48, 48), box_jitter=3)
        _check_labels_and_boxes(gts, boxes, jitter=3)


def test_microscopy_has_many_objects_and_rgb_modalities_have_colour():
    _, gts, boxes = phantoms.make_case_2d(np.random.default_rng(0), "Microscopy", 128)
    assert len(boxes) >= 8
    for modality in ("Endoscopy", "Dermoscopy"):
        imgs, _, _ = phantoms.make_case_2d(np.random.default_rng(0), modality, 64)
        assert np.abs(imgs[..., 0].astype(int) - imgs[..., 2]).mean() > 10
    for modality in ("CT", "MR", "US"):
        imgs, _, _ = phantoms.make_case_2d(np.random.default_rng(0), modality, 64)
        assert np.array_equal(imgs[..., 0], imgs[..., 1]) and np.array_equal(imgs[..., 1],
                                                                             imgs[..., 2])


@pytest.mark.parametrize("modality", phantoms.MODALITIES_2D)
def test_objects_stand_out_from_their_surroundings(modality):
    """Each object differs from a ring of background around it by more than the noise: a model
    can learn to find it."""
    for seed in range(3):
        imgs, gts, _ = phantoms.make_case_2d(np.random.default_rng(seed), modality, 96)
        grey = imgs.astype(np.float64).mean(axis=-1)
        for label in range(1, gts.max() + 1):
            inside = gts == label
            ring = ndimage.binary_dilation(inside, iterations=4) & ~ndimage.binary_dilation(
                inside, iterations=1) & (gts == 0)
            contrast = abs(grey[inside].mean() - grey[ring].mean())
            assert contrast > 12, (modality, seed, label, contrast)


def test_determinism_and_seed_dependence():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return (*phantoms.make_case_2d(rng, "Endoscopy", 48),
                *phantoms.make_case_3d(rng, "CT", (8, 40, 40)))

    first, again, other = draw(7), draw(7), draw(8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[3], other[3])


def test_unknown_modality_is_rejected():
    with pytest.raises(ValueError, match="Dermoscopy"):
        phantoms.make_case_3d(np.random.default_rng(0), "Dermoscopy", (8, 32, 32))
    with pytest.raises(ValueError, match="PET"):
        phantoms.make_case_2d(np.random.default_rng(0), "PET", 32)


def test_write_phantom_dataset_is_readable_and_deterministic(tmp_path):
    kwargs = dict(n2d=3, n3d=2, seed=5, size_2d=48, shape_3d=(8, 40, 40))
    dataset = phantoms.write_phantom_dataset(tmp_path / "a", **kwargs)
    assert dataset.names == ("2DBox_CT_0000", "2DBox_MR_0001", "2DBox_US_0002",
                             "3DBox_CT_0000", "3DBox_MR_0001")
    assert [p.name for p in rio.discover_cases(dataset.inputs_dir)] == [
        f"{name}.npz" for name in dataset.names]
    for name in dataset.names:
        case = rio.read_case(dataset.inputs_dir / f"{name}.npz")       # valid challenge input
        with np.load(dataset.gts_dir / f"{name}.npz") as truth:
            gts = truth["gts"]
            assert gts.shape == case.spatial_shape
            _check_labels_and_boxes(gts, case.boxes)
            assert ("spacing" in truth.files) == case.is_3d
            if case.is_3d:
                np.testing.assert_array_equal(truth["spacing"], case.spacing)
    # Same seed -> same content (case by case); another seed -> different content.
    again = phantoms.write_phantom_dataset(tmp_path / "b", **kwargs)
    changed = phantoms.write_phantom_dataset(tmp_path / "c", **{**kwargs, "seed": 6})
    for name in dataset.names:
        with np.load(dataset.inputs_dir / f"{name}.npz") as x, \
                np.load(again.inputs_dir / f"{name}.npz") as y, \
                np.load(changed.inputs_dir / f"{name}.npz") as z:
            np.testing.assert_array_equal(x["imgs"], y["imgs"])
            np.testing.assert_array_equal(x["boxes"], y["boxes"])
            assert not np.array_equal(x["imgs"], z["imgs"])
    # A case does not depend on how many cases are written.
    fewer = phantoms.write_phantom_dataset(tmp_path / "d", **{**kwargs, "n2d": 1, "n3d": 1})
    with np.load(fewer.inputs_dir / "3DBox_CT_0000.npz") as x, \
            np.load(dataset.inputs_dir / "3DBox_CT_0000.npz") as y:
        np.testing.assert_array_equal(x["imgs"], y["imgs"])


def test_mni152_case_offline(tmp_path, monkeypatch):
    """The MNI152 templates ship inside nilearn: building the case must not touch the network."""
    def no_network(*args, **kwargs):
        raise AssertionError("mni152_case tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    imgs, gts, boxes, spacing = phantoms.mni152_case(tmp_path, downsample=4)

    assert imgs.dtype == gts.dtype == np.uint8 and imgs.shape == gts.shape
    assert 30 <= min(imgs.shape) and max(imgs.shape) <= 60        # 1 mm / 4, cropped
    np.testing.assert_array_equal(spacing, [4.0, 4.0, 4.0])
    assert set(np.unique(gts)) == {0, 1, 2}
    _check_labels_and_boxes(gts, boxes)
    white, grey = gts == 1, gts == 2
    assert 0.2 < white.sum() / grey.sum() < 2.0
    # T1 contrast: white matter is brighter than grey matter, both brighter than background.
    assert imgs[white].mean() > imgs[grey].mean() + 20
    assert imgs[grey].mean() > imgs[gts == 0].mean()
    # Axial slices in (D, H, W): the brain is taller (anterior-posterior, H) than wide (W),
    # and the grey-matter box encloses the white-matter one.
    assert boxes[1, 4] - boxes[1, 1] > boxes[1, 3] - boxes[1, 0]
    assert np.all(boxes[1, :3] <= boxes[0, :3]) and np.all(boxes[1, 3:] >= boxes[0, 3:])

    case = rio.read_case(tmp_path / "inputs" / f"{phantoms.MNI152_NAME}.npz")
    assert case.is_3d and case.image.shape == imgs.shape
    with np.load(tmp_path / "gts" / f"{phantoms.MNI152_NAME}.npz") as truth:
        np.testing.assert_array_equal(truth["gts"], gts)
