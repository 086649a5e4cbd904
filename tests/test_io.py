"""Reading and writing cases: challenge npz, NIfTI geometry, PNG/JPEG, sidecars, errors, atomicity.

Expected values are worked out by hand from the formats' definitions and the challenge's rules, and test
inputs are written with independent libraries (Pillow for images, nibabel directly for NIfTI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from rep_medsam_jax import io as rio

RNG = np.random.default_rng(0)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _image_2d(h=20, w=30):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Challenge npz
# --------------------------------------------------------------------------------------------

def test_npz_2d_round_trip(tmp_path):
    image = _image_2d()
    boxes = np.array([[1, 2, 10, 12], [0, 0, 30, 20]])       # x may reach W, y may reach H
    case = rio.read_case(_npz(tmp_path / "2DBox_US_0001.npz", imgs=image, boxes=boxes))
    assert not case.is_3d and case.output_format == "npz"
    assert case.name == "2DBox_US_0001" and case.output_name == "2DBox_US_0001.npz"
    np.testing.assert_array_equal(case.image, image)
    np.testing.assert_array_equal(case.boxes, boxes)
    assert case.spatial_shape == (20, 30)

    segs = np.zeros((20, 30), np.int64)
    segs[2:12, 1:10] = 1
    out = rio.write_segmentation(case, segs, tmp_path / "out")
    assert out == tmp_path / "out" / "2DBox_US_0001.npz"
    with np.load(out) as saved:
        assert saved.files == ["segs"]
        assert saved["segs"].dtype == np.uint8
        np.testing.assert_array_equal(saved["segs"], segs)
    assert sorted(os.listdir(tmp_path / "out")) == ["2DBox_US_0001.npz"]


def test_npz_3d_round_trip_with_spacing(tmp_path):
    volume = RNG.integers(0, 256, (5, 8, 9), dtype=np.uint8)
    boxes = np.array([[0, 0, 0, 9, 8, 4], [2.5, 1.0, 1, 6.0, 7.5, 3]])
    path = _npz(tmp_path / "3DBox_CT_0007.npz", imgs=volume, boxes=boxes,
                spacing=np.array([0.8, 0.8, 2.5]))
    case = rio.read_case(path)
    assert case.is_3d and case.spatial_shape == (5, 8, 9)
    np.testing.assert_array_equal(case.image, volume)
    np.testing.assert_array_equal(case.boxes, boxes)
    np.testing.assert_array_equal(case.spacing, [0.8, 0.8, 2.5])
    segs = np.zeros((5, 8, 9), np.uint8)
    segs[1:4, 2:5, 3:7] = 2
    with np.load(rio.write_segmentation(case, segs, tmp_path)) as saved:
        np.testing.assert_array_equal(saved["segs"], segs)


def test_npz_grey_2d_is_repeated_and_integer_dtypes_converted(tmp_path):
    grey = RNG.integers(0, 256, (6, 7)).astype(np.int16)
    case = rio.read_case(_npz(tmp_path / "2D_grey.npz", imgs=grey, boxes=[[0, 0, 3, 3]]))
    assert case.image.dtype == np.uint8 and case.image.shape == (6, 7, 3)
    for channel in range(3):
        np.testing.assert_array_equal(case.image[..., channel], grey)
    whole = np.full((4, 4, 3), 255.0, np.float32)            # whole-valued floats are fine
    case = rio.read_case(_npz(tmp_path / "float.npz", imgs=whole, boxes=[[0, 0, 1, 1]]))
    assert case.image.dtype == np.uint8 and case.image.max() == 255


def test_labels_of_256_or_more_are_written_as_uint16(tmp_path):
    case = rio.read_case(_npz(tmp_path / "2Dx.npz", imgs=_image_2d(), boxes=[[0, 0, 2, 2]]))
    segs = np.zeros((20, 30), np.int32)
    segs[0, 0] = 300
    with np.load(rio.write_segmentation(case, segs, tmp_path / "o")) as saved:
        assert saved["segs"].dtype == np.uint16 and saved["segs"][0, 0] == 300


@pytest.mark.parametrize("arrays, error, words", [
    ({"boxes": [[0, 0, 1, 1]]}, rio.MissingKeyError, ["'imgs'"]),
    ({"imgs": np.zeros((4, 4, 3), np.uint8)}, rio.MissingBoxesError, ["'boxes'"]),
    ({"imgs": np.zeros((0, 4, 3), np.uint8), "boxes": [[0, 0, 1, 1]]},
     rio.EmptyImageError, ["empty"]),
    ({"imgs": np.full((4, 4, 3), 300, np.int32), "boxes": [[0, 0, 1, 1]]},
     rio.ImageDtypeError, ["300", "0..255"]),
    ({"imgs": np.full((4, 4, 3), -1, np.int16), "boxes": [[0, 0, 1, 1]]},
     rio.ImageDtypeError, ["0..255"]),
    ({"imgs": np.full((4, 4, 3), 0.5, np.float32), "boxes": [[0, 0, 1, 1]]},
     rio.ImageDtypeError, ["non-integer"]),
    ({"imgs": np.where(np.eye(4)[..., None] > 0, np.nan, 1.0) * np.ones(3),
      "boxes": [[0, 0, 1, 1]]}, rio.NonFiniteImageError, ["12 NaN"]),
    ({"imgs": np.zeros((4, 4, 3), np.uint8), "boxes": np.zeros((2, 5))},
     rio.BoxShapeError, ["(N, 4)", "(2, 5)"]),
    ({"imgs": np.zeros((4, 4, 3), np.uint8), "boxes": [0, 0, 1, 1]},
     rio.BoxShapeError, ["(N, 4)"]),
    ({"imgs": np.zeros((4, 4, 3), np.uint8), "boxes": [[0, 0, np.nan, 1]]},
     rio.BoxShapeError, ["NaN"]),
    ({"imgs": np.zeros((4, 6, 3), np.uint8), "boxes": [[0, 0, 1, 1], [1, 1, 7, 3]]},
     rio.BoxOutOfBoundsError, ["box 2", "4x6"]),
    ({"imgs": np.zeros((4, 6, 3), np.uint8), "boxes": [[-1, 0, 1, 1]]},
     rio.BoxOutOfBoundsError, ["box 1"]),
    ({"imgs": np.zeros((4, 6, 3), np.uint8), "boxes": [[0, 0, 2, 2], [3, 0, 2, 2]]},
     rio.InvertedBoxError, ["box 2", "x_min > x_max"]),
    ({"imgs": np.zeros((4, 6, 3), np.uint8), "boxes": np.zeros((0, 4))},
     rio.MissingBoxesError, ["empty"]),
    ({"imgs": np.zeros((4, 6, 9), np.uint8), "boxes": [[0, 0, 1, 1]]},
     rio.ImageShapeError, ["'3D'"]),
])
def test_bad_2d_npz_raises_a_clear_case_error(tmp_path, arrays, error, words):
    path = _npz(tmp_path / "2DBox_bad.npz", **arrays)
    with pytest.raises(error) as info:
        rio.read_case(path)
    assert isinstance(info.value, rio.CaseError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert "2DBox_bad.npz" in message
    for word in words:
        assert word in message


def test_3d_npz_box_past_the_last_slice_is_clipped(tmp_path):
    # The reference crashed on z_max >= D (its embedding loop indexed past the volume); the
    # per-box loop clipped. We clip z_max to D - 1 and keep z_min.
    path = _npz(tmp_path / "3DBox_deep.npz", imgs=np.zeros((4, 5, 6), np.uint8),
                boxes=np.asarray([[0, 0, 1, 6, 5, 9], [0, 0, 0, 2, 2, 2]]))
    case = rio.read_case(path)
    np.testing.assert_array_equal(case.boxes, [[0, 0, 1, 6, 5, 3], [0, 0, 0, 2, 2, 2]])


@pytest.mark.parametrize("imgs, boxes, error, words", [
    (np.zeros((4, 5, 6), np.uint8), [[0, 0, 4, 6, 5, 5]], rio.BoxOutOfBoundsError,
     ["box 1", "z <= 3"]),                                     # starts past the last slice
    (np.zeros((4, 5, 6), np.uint8), [[0, 0, 0, 7, 5, 3]], rio.BoxOutOfBoundsError,
     ["box 1", "x <= 6"]),
    (np.zeros((4, 5, 6), np.uint8), [[0, 0, 0, 2, 2]], rio.BoxShapeError, ["(N, 6)"]),
    (np.zeros((4, 5, 6), np.uint8), [[0, 0, 0, 2, 2, 3], [0, 0, 3, 2, 2, 1]],
     rio.InvertedBoxError, ["box 2", "z_min > z_max"]),
    (np.zeros((4, 5), np.uint8), [[0, 0, 0, 2, 2, 3]], rio.ImageShapeError, ["(D, H, W)"]),
    (np.zeros((4, 0, 6), np.uint8), [[0, 0, 0, 2, 2, 3]], rio.EmptyImageError, ["empty"]),
])
def test_bad_3d_npz_raises_a_clear_case_error(tmp_path, imgs, boxes, error, words):
    path = _npz(tmp_path / "3DBox_bad.npz", imgs=imgs, boxes=np.asarray(boxes))
    with pytest.raises(error) as info:
        rio.read_case(path)
    for word in ["3DBox_bad.npz", *words]:
        assert word in str(info.value)


def test_corrupt_and_unsupported_files_raise_case_read_error(tmp_path):
    broken = tmp_path / "2D_broken.npz"
    broken.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(rio.CaseReadError, match="2D_broken.npz"):
        rio.read_case(broken)
    pickled = tmp_path / "2D_pickle.npz"
    np.savez(pickled, imgs=np.array([{"a": 1}], dtype=object), boxes=[[0, 0, 1, 1]])
    with pytest.raises(rio.CaseReadError):                 # object arrays are never unpickled
        rio.read_case(pickled)
    bare = tmp_path / "2D_bare.npz"
    with open(bare, "wb") as handle:
        np.save(handle, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(rio.CaseReadError, match="not an npz"):
        rio.read_case(bare)
    with pytest.raises(rio.CaseReadError, match="unsupported"):
        rio.read_case(tmp_path / "notes.txt")
    bad_png = tmp_path / "x.png"
    bad_png.write_bytes(b"\x89PNG garbage")
    with pytest.raises(rio.CaseReadError, match="decode"):
        rio.read_case(bad_png, boxes_override=[[0, 0, 1, 1]])


def test_boxes_override_replaces_stored_boxes(tmp_path):
    path = _npz(tmp_path / "2D.npz", imgs=_image_2d(), boxes=[[0, 0, 1, 1]])
    case = rio.read_case(path, boxes_override=[[3, 4, 5, 6], [0, 0, 30, 20]])
    np.testing.assert_array_equal(case.boxes, [[3, 4, 5, 6], [0, 0, 30, 20]])


def test_write_rejects_a_label_map_of_the_wrong_shape(tmp_path):
    case = rio.read_case(_npz(tmp_path / "2D.npz", imgs=_image_2d(), boxes=[[0, 0, 1, 1]]))
    with pytest.raises(rio.SegmentationError, match=r"\(20, 30\)"):
        rio.write_segmentation(case, np.zeros((30, 20), np.uint8), tmp_path / "out")
    with pytest.raises(rio.SegmentationError, match="integers"):
        rio.write_segmentation(case, np.zeros((20, 30), np.float32), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------

# Three storage orders, each with the hand-derived map from the (D, H, W) array back to the
# stored voxel (i, j, k) for a volume of stored shape (X, Y, Z) (LPS target, array = (z, y, x)).
RAS = np.diag([0.7, 0.8, 2.5, 1.0])            # i -> R, j -> A, k -> S
LPS = np.diag([-0.7, -0.8, 2.5, 1.0])          # i -> L, j -> P, k -> S (ITK identity direction)
SAGITTAL = np.array([[0, 0, 0.9, 0], [0, 1.1, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1.0]])
# SAGITTAL: i -> S, j -> A, k -> R


def _expected_stored_index(affine_name, d, h, w, shape):
    x_n, y_n, z_n = shape
    if affine_name == "RAS":        # x(L) = flipped i, y(P) = flipped j, z(S) = k
        return (x_n - 1 - w, y_n - 1 - h, d)
    if affine_name == "LPS":
        return (w, h, d)
    # SAGITTAL: x(L) = flipped k, y(P) = flipped j, z(S) = i
    return (d, y_n - 1 - h, z_n - 1 - w)


def _expected_dhw_shape(affine_name, shape):
    x_n, y_n, z_n = shape
    return (x_n, y_n, z_n) if affine_name == "SAGITTAL" else (z_n, y_n, x_n)


def _write_nifti(path, data, affine, qform_code=1, sform_code=2):
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=qform_code)
    image.header.set_sform(affine, code=sform_code)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = b"test volume"
    nib.save(image, path)
    return image


@pytest.mark.parametrize("affine_name, affine", [("RAS", RAS), ("LPS", LPS),
                                                 ("SAGITTAL", SAGITTAL)])
def test_nifti_axis_convention_and_geometry_round_trip(tmp_path, affine_name, affine):
    shape = (7, 6, 5)
    data = np.zeros(shape, np.int16)
    data[...] = 10
    marker = (1, 2, 3)                   # one bright voxel, findable after reordering
    data[marker] = 1000
    path = tmp_path / "scan.nii.gz"
    _write_nifti(path, data, affine)
    # Box in stored voxel indices around the marker: i 0..2, j 1..4, k 3..3.
    # (CT window: the marker saturates at 255, the rest stays below.)
    (tmp_path / "scan.json").write_text(json.dumps({"boxes": [[0, 1, 3, 2, 4, 3]],
                                                    "labels": ["marker"], "modality": "CT"}))
    case = rio.read_case(path)

    assert case.is_3d and case.output_format == "nifti" and case.output_name == "scan.nii.gz"
    assert case.labels == ("marker",)
    assert case.image.shape == _expected_dhw_shape(affine_name, shape)
    found = tuple(int(v) for v in np.argwhere(case.image == case.image.max())[0])
    assert _expected_stored_index(affine_name, *found, shape) == marker

    # The box, mapped by hand: its corners map to the reordered array's corners.
    corners = [_expected_stored_index(affine_name, d, h, w, shape)
               for d in range(case.image.shape[0]) for h in range(case.image.shape[1])
               for w in range(case.image.shape[2])
               if (case.boxes[0, 2] <= d <= case.boxes[0, 5] and case.boxes[0, 1] <= h
                   <= case.boxes[0, 4] and case.boxes[0, 0] <= w <= case.boxes[0, 3])]
    covered = np.array(corners)
    np.testing.assert_array_equal(covered.min(0), [0, 1, 3])
    np.testing.assert_array_equal(covered.max(0), [2, 4, 3])
    assert len(covered) == 3 * 4 * 1

    # Spacing is (x, y, z) of the reordered array: the zooms of the stored axes mapped there.
    zooms = nib.load(path).header.get_zooms()
    expected_spacing = ((zooms[2], zooms[1], zooms[0]) if affine_name == "SAGITTAL"
                        else zooms)
    np.testing.assert_allclose(case.spacing, expected_spacing, rtol=1e-6)

    # Write labels painted in array space; they must land on the stored grid by the same map.
    segs = np.zeros(case.image.shape, np.uint8)
    segs[found] = 7
    segs[0, 0, 0] = 3
    out = rio.write_segmentation(case, segs, tmp_path / "out")
    assert out.name == "scan.nii.gz"
    written = nib.load(out)
    source = nib.load(path)
    stored = np.asarray(written.dataobj)
    assert stored.dtype == np.uint8 and stored.shape == shape
    assert stored[marker] == 7
    assert stored[_expected_stored_index(affine_name, 0, 0, 0, shape)] == 3
    assert np.count_nonzero(stored) == 2
    np.testing.assert_allclose(written.affine, source.affine)
    for code in ("qform_code", "sform_code"):
        assert written.header[code] == source.header[code]
    np.testing.assert_allclose(written.header.get_qform(), source.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(written.header.get_sform(), source.header.get_sform())
    np.testing.assert_allclose(written.header.get_zooms(), source.header.get_zooms())
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert written.header["descrip"] == source.header["descrip"]


def test_nifti_keeps_the_input_extension_and_trailing_singleton_axis(tmp_path):
    path = tmp_path / "vol.nii"
    _write_nifti(path, np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2, 1), LPS)
    case = rio.read_case(path, boxes_override=[[0, 0, 0, 3, 2, 1]])
    assert case.image.shape == (2, 3, 4)
    out = rio.write_segmentation(case, np.ones((2, 3, 4), np.uint8), tmp_path / "out")
    assert out.name == "vol.nii" and nib.load(out).shape == (4, 3, 2, 1)


def test_nifti_ct_window_matches_hand_values(tmp_path):
    # HU -1000, -160, 40, 240, 1000 -> clip to [-160, 240] -> min-max over [-160, 240]:
    # (v + 160) / 400 * 255 -> 0, 0, 127.5 (truncated to 127), 255, 255.
    hu = np.array([-1000, -160, 40, 240, 1000], np.float32).reshape(5, 1, 1)
    path = tmp_path / "ct.nii.gz"
    _write_nifti(path, hu, LPS)
    case = rio.read_case(path, boxes_override=[[0, 0, 0, 4, 0, 0]], modality="CT")
    np.testing.assert_array_equal(case.image.ravel(), [0, 0, 127, 255, 255])
    # A custom window from the sidecar: level 0, width 200 -> [-100, 100]; 40 -> 178.5 -> 178.
    (tmp_path / "ct.json").write_text(json.dumps(
        {"boxes": [[0, 0, 0, 4, 0, 0]], "modality": "ct", "ct_window": [0, 200]}))
    case = rio.read_case(path)
    np.testing.assert_array_equal(case.image.ravel(), [0, 0, 178, 255, 255])


def test_intensity_rules_match_the_whole_volume_float64_formula():
    # The slice-wise implementation must equal the reference's whole-volume arithmetic:
    # clip, then (x - min) / (max - min) * 255 over the clipped volume, truncated.
    hu = RNG.integers(-1100, 1500, (6, 9, 11)).astype(np.int16)
    clipped = np.clip(hu.astype(np.float64), -160, 240)
    expected = ((clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(rio.window_ct(hu), expected)
    mr = np.where(RNG.random((6, 9, 11)) < 0.3, 0.0, RNG.gamma(2.0, 50.0, (6, 9, 11)))
    low, high = np.percentile(mr[mr > 0], [0.5, 99.5])
    clipped = np.clip(mr, low, high)
    expected = ((clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255).astype(np.uint8)
    expected[mr == 0] = 0
    np.testing.assert_array_equal(rio.percentile_to_uint8(mr), expected)


def test_nifti_percentile_rule_matches_hand_values(tmp_path):
    # 1001 positive voxels: one 5, five hundred 10, five hundred 20 (plus zeros). Percentiles of
    # the positives: 0.5th -> sorted index 5 -> 10; 99.5th -> index 995 -> 20. So 5 and 10 -> 0,
    # 20 -> 255, and zeros stay 0.
    values = np.array([0] * 50 + [5] + [10] * 500 + [20] * 500, np.float32)
    path = tmp_path / "mr.nii.gz"
    _write_nifti(path, values.reshape(-1, 1, 1), LPS)
    case = rio.read_case(path, boxes_override=[[0, 0, 0, 1, 0, 0]])
    flat = case.image.ravel()
    assert set(flat[:51]) == {0} and set(flat[51:551]) == {0} and set(flat[551:]) == {255}


def test_nifti_errors(tmp_path):
    path = tmp_path / "v.nii.gz"
    _write_nifti(path, np.ones((4, 4, 3), np.float32), LPS)
    with pytest.raises(rio.MissingBoxesError, match="v.json"):
        rio.read_case(path)
    (tmp_path / "v.json").write_text("{not json")
    with pytest.raises(rio.SidecarError, match="v.json"):
        rio.read_case(path)
    (tmp_path / "v.json").write_text(json.dumps({"boxes": [[0, 0, 0, 3, 3, 3]]}))
    with pytest.raises(rio.BoxOutOfBoundsError, match="box 1"):      # k only goes to 2
        rio.read_case(path)
    (tmp_path / "v.json").write_text(json.dumps({"boxes": [[0, 0, 0, 4, 3, 2]]}))
    with pytest.raises(rio.BoxOutOfBoundsError, match="inclusive"):  # i only goes to 3
        rio.read_case(path)
    (tmp_path / "v.json").write_text(json.dumps({"boxes": [[0, 0, 0, 3, 3, 2]],
                                                 "labels": ["a", "b"]}))
    with pytest.raises(rio.SidecarError, match="2 label"):
        rio.read_case(path)
    (tmp_path / "v.json").write_text(json.dumps({"boxes": [[0, 0, 0, 3, 3, 2]], "box": []}))
    with pytest.raises(rio.SidecarError, match="unknown"):
        rio.read_case(path)

    nan_path = tmp_path / "nan.nii.gz"
    data = np.ones((4, 4, 3), np.float32)
    data[1, 2, 0] = np.nan
    _write_nifti(nan_path, data, LPS)
    with pytest.raises(rio.NonFiniteImageError, match="1 NaN"):
        rio.read_case(nan_path, boxes_override=[[0, 0, 0, 1, 1, 1]])

    series = tmp_path / "series.nii.gz"
    _write_nifti(series, np.ones((4, 4, 3, 2), np.float32), LPS)
    with pytest.raises(rio.ImageShapeError, match="one 3D volume"):
        rio.read_case(series, boxes_override=[[0, 0, 0, 1, 1, 1]])

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(rio.CaseReadError, match="broken.nii.gz"):
        rio.read_case(broken, boxes_override=[[0, 0, 0, 1, 1, 1]])


# --------------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------------

def _sidecar(path: Path, boxes, **extra) -> None:
    path.with_suffix(".json").write_text(json.dumps({"boxes": boxes, **extra}))


def test_png_rgb_rgba_and_grey(tmp_path):
    rgb = _image_2d(9, 11)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((9, 11, 1), 17, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    grey = rgb[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    for name in ("rgb", "rgba", "grey"):
        _sidecar(tmp_path / f"{name}.png", [[1, 1, 5, 5]], labels=["lesion"])

    case = rio.read_case(tmp_path / "rgb.png")
    np.testing.assert_array_equal(case.image, rgb)           # RGB order, not OpenCV's BGR
    assert case.output_format == "png" and case.labels == ("lesion",)
    np.testing.assert_array_equal(rio.read_case(tmp_path / "rgba.png").image, rgb)
    grey_case = rio.read_case(tmp_path / "grey.png")
    np.testing.assert_array_equal(grey_case.image, np.repeat(grey[..., None], 3, axis=-1))

    segs = np.zeros((9, 11), np.uint8)
    segs[1:5, 1:5] = 1
    out = rio.write_segmentation(case, segs, tmp_path / "out")
    assert out.name == "rgb.png"
    with Image.open(out) as written:
        np.testing.assert_array_equal(np.asarray(written), segs)


def test_png_16_bit_is_min_max_scaled(tmp_path):
    # 100, 1100, 2100 -> (v - 100) / 2000 * 255 -> 0, 127.5 -> 127 (truncated), 255.
    deep = np.array([[100, 1100, 2100]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    case = rio.read_case(tmp_path / "deep.png", boxes_override=[[0, 0, 2, 0]])
    np.testing.assert_array_equal(case.image[0, :, 0], [0, 127, 255])
    # A 16-bit image whose values fit 0..255 keeps them.
    shallow = np.array([[3, 200, 255]], np.uint16)
    Image.fromarray(shallow).save(tmp_path / "shallow.png")
    case = rio.read_case(tmp_path / "shallow.png", boxes_override=[[0, 0, 2, 0]])
    np.testing.assert_array_equal(case.image[0, :, 1], [3, 200, 255])


def test_jpeg_and_uint16_label_png(tmp_path):
    grey = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (12, 1))
    Image.fromarray(grey, "L").save(tmp_path / "photo.JPEG", quality=95)
    _sidecar(tmp_path / "photo.JPEG", [[0, 0, 15, 11]])
    case = rio.read_case(tmp_path / "photo.JPEG")
    assert case.image.shape == (12, 16, 3) and case.image.dtype == np.uint8
    assert np.abs(case.image[..., 0].astype(int) - grey).max() <= 8        # lossy
    assert case.output_name == "photo.png"
    segs = np.zeros((12, 16), np.int32)
    segs[0, 0] = 256
    out = rio.write_segmentation(case, segs, tmp_path / "out")
    with Image.open(out) as written:
        labels = np.asarray(written)
    assert labels.dtype == np.uint16 and labels[0, 0] == 256 and labels.sum() == 256


def test_image_boxes_are_checked_and_required(tmp_path):
    Image.fromarray(_image_2d(9, 11)).save(tmp_path / "a.png")
    with pytest.raises(rio.MissingBoxesError, match="a.json"):
        rio.read_case(tmp_path / "a.png")
    _sidecar(tmp_path / "a.png", [[0, 0, 12, 5]])
    with pytest.raises(rio.BoxOutOfBoundsError, match="box 1"):
        rio.read_case(tmp_path / "a.png")
    _sidecar(tmp_path / "a.png", [[0, 0, 5]])
    with pytest.raises(rio.BoxShapeError):
        rio.read_case(tmp_path / "a.png")
    _sidecar(tmp_path / "a.png", [])
    with pytest.raises(rio.MissingBoxesError, match="empty"):
        rio.read_case(tmp_path / "a.png")


# --------------------------------------------------------------------------------------------
# Discovery, atomic writes, imports
# --------------------------------------------------------------------------------------------

def test_discover_cases_sorted_and_filtered(tmp_path):
    for name in ("b.nii.gz", "a.npz", "c.PNG", "d.jpg", "e.jpeg", "f.nii", "a.json", ".tmp-x-a.npz",
                 "notes.txt", "g.nii.gz.bak"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.npz").mkdir()
    assert [p.name for p in rio.discover_cases(tmp_path)] == [
        "a.npz", "b.nii.gz", "c.PNG", "d.jpg", "e.jpeg", "f.nii"]
    assert rio.case_name("b.nii.gz") == "b" and rio.case_name("c.PNG") == "c"
    with pytest.raises(NotADirectoryError):
        rio.discover_cases(tmp_path / "missing")


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out" / "result.npz"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with rio.atomic_write(target) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half a file")
            raise RuntimeError("disk on fire")
    assert os.listdir(tmp_path / "out") == []

    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with rio.atomic_write(target) as tmp:
            tmp.write_bytes(b"new but incomplete")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and os.listdir(tmp_path / "out") == ["result.npz"]

    rio.write_text_atomic(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path / "out") == ["result.npz"]


def test_write_segmentation_is_atomic_when_saving_fails(tmp_path, monkeypatch):
    case = rio.read_case(_npz(tmp_path / "2D.npz", imgs=_image_2d(), boxes=[[0, 0, 1, 1]]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "2D.npz").write_bytes(b"previous result")

    def failing_save(handle, **arrays):
        handle.write(b"PK partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(np, "savez_compressed", failing_save)
    with pytest.raises(OSError, match="no space"):
        rio.write_segmentation(case, np.zeros((20, 30), np.uint8), tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["2D.npz"]
    assert (tmp_path / "out" / "2D.npz").read_bytes() == b"previous result"


def test_io_does_not_import_jax():
    code = ("import sys, numpy as np, tempfile, pathlib; import rep_medsam_jax.io as rio; "
            "d = pathlib.Path(tempfile.mkdtemp()); "
            "np.savez(d / '2D.npz', imgs=np.zeros((4, 4, 3), np.uint8), boxes=[[0, 0, 1, 1]]); "
            "c = rio.read_case(d / '2D.npz'); "
            "rio.write_segmentation(c, np.zeros((4, 4), np.uint8), d); "
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules, 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
