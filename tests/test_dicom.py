"""DICOM input (rep_medsam_jax.io.dicom): 2D files, 3D series folders, geometry, bad input.

Series are written here with pydicom from known pixel values and positions, so every expected
value (windowed intensities, slice order, affine, spacing, output grid) is computed by hand from
the DICOM standard's definitions, not by the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from rep_medsam_jax import io as rio  # noqa: E402
from rep_medsam_jax.io.dicom import read_dicom_series, series_files  # noqa: E402
from rep_medsam_jax.predictor.run import predict_folder  # noqa: E402
from tests.test_predictor import ThresholdBackend  # noqa: E402

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _write_slice(path: Path, pixels: np.ndarray, position=(0.0, 0.0, 0.0), orientation=AXIAL,
                 spacing=(0.8, 0.6), series_uid="1.2.826.0.1.3680043.8.498.1", modality="CT",
                 slope=1.0, intercept=-1024.0, photometric="MONOCHROME2", frames=None,
                 preamble=True) -> Path:
    """One uncompressed single-sample slice; ``spacing`` is PixelSpacing [row gap, column gap]."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = modality, series_uid
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelSpacing = [f"{v:g}" for v in spacing]
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:g}" for v in position]
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=preamble)
    return path


def _window(hu: np.ndarray, low=-160.0, high=240.0) -> np.ndarray:
    """The challenge's CT rule (window 40 / 400), by hand: clip, min-max over the clipped range, truncate."""
    clipped = np.clip(hu.astype(np.float64), low, high)
    return ((clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255).astype(np.uint8)


def _series(folder: Path, stored: np.ndarray, heights, **kwargs) -> list[Path]:
    """stored: (Z, rows, cols) raw values; slice z at ImagePositionPatient (0, 0, heights[z]).
    File names run against the positions, so name order is not slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    return [_write_slice(folder / f"im{len(heights) - z:03d}.dcm", stored[z], (0.0, 0.0, h),
                         **kwargs) for z, h in enumerate(heights)]


def test_2d_ct_file_is_windowed_in_hounsfield_units(tmp_path):
    source = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    shutil.copy(source, tmp_path / "slice.dcm")
    raw = pydicom.dcmread(source).pixel_array.astype(np.float64)
    hu = raw * 1.0 - 1024.0                       # the file's RescaleSlope 1, Intercept -1024
    case = rio.read_case(tmp_path / "slice.dcm", boxes_override=[[10, 20, 60, 80]])
    assert not case.is_3d and case.image.shape == (128, 128, 3)
    for channel in range(3):
        np.testing.assert_array_equal(case.image[:, :, channel], _window(hu))
    # The sidecar's window replaces the default: level 0, width 200 -> [-100, 100].
    (tmp_path / "slice.json").write_text(json.dumps({"boxes": [[1, 2, 3, 4]],
                                                     "ct_window": [0, 200]}))
    case = rio.read_case(tmp_path / "slice.dcm")
    np.testing.assert_array_equal(case.image[:, :, 0], _window(hu, -100, 100))
    out = rio.write_segmentation(case, np.ones((128, 128), np.uint8), tmp_path / "out")
    assert out.name == "slice.png"


def test_2d_grey_rules_and_monochrome1_inversion(tmp_path):
    # Not CT, whole values within 0..255: cast as they are.
    small = np.arange(12, dtype=np.int16).reshape(3, 4) * 20
    _write_slice(tmp_path / "a.dcm", small, modality="DX", intercept=0.0)
    image = rio.read_case(tmp_path / "a.dcm", boxes_override=[[0, 0, 1, 1]]).image
    np.testing.assert_array_equal(image[:, :, 0], small)
    # 12-bit range: min-max to 0..255, truncated: (v - 0) / 4000 * 255.
    wide = np.array([[0, 1000], [2000, 4000]], np.int16)
    _write_slice(tmp_path / "b.dcm", wide, modality="CR", intercept=0.0)
    image = rio.read_case(tmp_path / "b.dcm", boxes_override=[[0, 0, 1, 1]]).image
    np.testing.assert_array_equal(image[:, :, 0], [[0, 63], [127, 255]])
    # MONOCHROME1: lowest value is white, so it is inverted after scaling.
    _write_slice(tmp_path / "c.dcm", wide, modality="CR", intercept=0.0,
                 photometric="MONOCHROME1")
    image = rio.read_case(tmp_path / "c.dcm", boxes_override=[[0, 0, 1, 1]]).image
    np.testing.assert_array_equal(image[:, :, 0], [[255, 192], [128, 0]])


def test_series_is_sorted_by_position_windowed_and_keeps_its_geometry(tmp_path):
    rng = np.random.default_rng(3)
    depth, rows, cols = 5, 6, 7
    stored = rng.integers(800, 1400, (depth, rows, cols)).astype(np.int16)
    heights = [-20.0, -17.5, -15.0, -12.5, -10.0]
    order = [3, 0, 4, 1, 2]                     # written positions shuffled against the data
    series = tmp_path / "cases" / "chest.1"
    _series(series, stored[order], [heights[i] for i in order], spacing=(0.8, 0.6))
    (tmp_path / "cases" / "chest.1.json").write_text(json.dumps(
        {"boxes": [[1, 2, 0, 5, 4, 4]], "labels": ["lesion"]}))

    assert rio.discover_cases(tmp_path / "cases") == [series]
    case = rio.read_case(series)
    assert case.is_3d and case.name == "chest.1" and case.labels == ("lesion",)
    # An axial series is already LPS: (D, H, W) = (slices ascending in z, rows, columns).
    np.testing.assert_array_equal(case.image, _window(stored.astype(np.float64) - 1024.0))
    np.testing.assert_allclose(case.spacing, [0.6, 0.8, 2.5])        # (x, y, z)
    np.testing.assert_array_equal(case.boxes, [[1, 2, 0, 5, 4, 4]])

    # The affine by the DICOM definition: column index along +x (L) by the column gap 0.6,
    # row index along +y (P) by the row gap 0.8, slices along +z (S) by 2.5 from the lowest
    # slice's position; then LPS -> RAS negates x and y.
    expected = np.array([[-0.6, 0, 0, 0], [0, -0.8, 0, 0], [0, 0, 2.5, -20.0], [0, 0, 0, 1]])
    labels = (case.image > 128).astype(np.uint8)
    out = rio.write_segmentation(case, labels, tmp_path / "out")
    assert out.name == "chest.1.nii.gz"
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, expected, atol=1e-6)
    assert written.header["qform_code"] == 1 and written.header["sform_code"] == 1
    # Stored grid (i = column, j = row, k = slice): the label map transposed back.
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels.transpose(2, 1, 0))


def test_sagittal_series_is_reoriented_like_a_nifti_and_written_back_on_its_grid(tmp_path):
    # Rows along -z (inferior), columns along +y (posterior), slices along +x (left).
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    stored = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) + 1000
    folder = tmp_path / "sag"
    folder.mkdir()
    for k in range(3):
        _write_slice(folder / f"{k}.dcm", stored[k], (2.0 * k, 0.0, 0.0), sagittal,
                     spacing=(1.0, 1.0))
    # The normal (row x column direction) is -x, so ascending order along it is k = 2, 1, 0.
    series = read_dicom_series(folder)
    assert series.volume.shape == (5, 4, 3)                # (columns, rows, slices)
    np.testing.assert_array_equal(series.volume[:, :, 1], stored[1].T - 1024.0)
    # Box in stored indices (i = column 0..4, j = row 0..3, k = slice 0..2).
    case = rio.read_case(folder, boxes_override=[[0, 0, 0, 4, 3, 2]])
    # LPS (D, H, W): D = z (superior) from the rows reversed, H = y from the columns,
    # W = x from the slices.
    assert case.image.shape == (4, 5, 3)
    hu = stored.astype(np.float64) - 1024.0                # (k, j, i)
    expected = _window(hu.transpose(1, 2, 0)[::-1])         # (j reversed, i, k)
    np.testing.assert_array_equal(case.image, expected)
    labels = np.zeros(case.spatial_shape, np.uint8)
    labels[0, 1, 2] = 7                                     # z index 0 = the last row
    out = rio.write_segmentation(case, labels, tmp_path / "out")
    voxels = np.asarray(nib.load(out).dataobj)
    # d 0 -> row j 3, h 1 -> column i 1, w 2 -> file slice 2 = grid slice 0.
    assert voxels.shape == (5, 4, 3) and np.argwhere(voxels).tolist() == [[1, 3, 0]]


def test_predict_folder_segments_dicom_images_and_series(tmp_path):
    cases = tmp_path / "in"
    stored = np.full((4, 40, 48), 24, np.int16)           # HU -1000 (air) ...
    stored[:, 10:30, 12:36] = 1200                        # ... and a bright 176 HU block
    _series(cases / "ct", stored, [0.0, 3.0, 6.0, 9.0])
    (cases / "ct.json").write_text(json.dumps({"boxes": [[8, 6, 0, 40, 34, 3]]}))
    _write_slice(cases / "xray.dcm", stored[0] * 0 + np.eye(40, 48, dtype=np.int16) * 300,
                 modality="DX", intercept=0.0)
    (cases / "xray.json").write_text(json.dumps({"boxes": [[0, 0, 47, 39]]}))
    (cases / "notes").mkdir()                              # no DICOM inside: not a case
    (cases / "notes" / "readme.txt").write_text("x")

    summary = predict_folder(ThresholdBackend(), cases, tmp_path / "out", show_progress=False)
    assert not summary.failures, summary.report()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct.nii.gz", "xray.png"]
    volume = np.asarray(nib.load(tmp_path / "out" / "ct.nii.gz").dataobj)
    assert volume.shape == (48, 40, 4)
    expected = np.zeros((48, 40, 4), np.uint8)
    expected[12:36, 10:30, :] = 1
    assert (volume == expected).mean() > 0.98


@pytest.mark.parametrize("problem, words", [
    ("two_series", "SeriesInstanceUID"),
    ("sizes", "image size"),
    ("duplicate", "same position"),
    ("gap", "uneven slice spacing"),
    ("no_position", "ImagePositionPatient"),
    ("truncated", "cannot read the DICOM|cannot decode the pixel data"),
    ("multiframe", "multi-frame"),
])
def test_bad_series_raise_a_clear_case_error(tmp_path, problem, words):
    folder = tmp_path / "s"
    pixels = np.zeros((4, 4), np.int16)
    heights = [0.0, 1.0, 2.0, 3.0]
    files = _series(folder, np.stack([pixels] * 4), heights)
    if problem == "two_series":
        _write_slice(files[1], pixels, (0, 0, 1.0), series_uid="1.2.3.4")
    elif problem == "sizes":
        _write_slice(files[1], np.zeros((4, 5), np.int16), (0, 0, 1.0))
    elif problem == "duplicate":
        _write_slice(files[1], pixels, (0, 0, 2.0))
    elif problem == "gap":
        _write_slice(files[1], pixels, (0, 0, 7.0))       # 0, 2, 3, 7: gaps 2, 1, 4
    elif problem == "no_position":
        ds = pydicom.dcmread(files[2])
        del ds.ImagePositionPatient
        ds.save_as(files[2])
    elif problem == "truncated":
        files[2].write_bytes(files[2].read_bytes()[:-10])
    elif problem == "multiframe":
        _write_slice(files[2], np.zeros((2, 4, 4), np.int16), (0, 0, 2.0), frames=2)
    with pytest.raises(rio.CaseError, match=words):
        rio.read_case(folder, boxes_override=[[0, 0, 0, 1, 1, 1]])


def test_bad_2d_dicom_files_raise_a_clear_case_error(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(rio.CaseReadError, match="cannot read the DICOM"):
        rio.read_case(tmp_path / "empty.dcm", boxes_override=[[0, 0, 1, 1]])
    _write_slice(tmp_path / "multi.dcm", np.zeros((3, 4, 4), np.int16), frames=3)
    with pytest.raises(rio.ImageShapeError, match="multi-frame"):
        rio.read_case(tmp_path / "multi.dcm", boxes_override=[[0, 0, 1, 1]])
    _write_slice(tmp_path / "nobox.dcm", np.zeros((4, 4), np.int16))
    with pytest.raises(rio.MissingBoxesError, match="nobox.json"):
        rio.read_case(tmp_path / "nobox.dcm")
    with pytest.raises(rio.BoxOutOfBoundsError):
        rio.read_case(tmp_path / "nobox.dcm", boxes_override=[[0, 0, 9, 9]])


def test_series_skips_objects_without_pixels_but_needs_one_image(tmp_path):
    stored = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4) + 1000
    _series(tmp_path / "s", stored, [0.0, 5.0])
    report = pydicom.dcmread(tmp_path / "s" / "im001.dcm")
    for keyword in ("PixelData", "Rows", "Columns"):     # e.g. a structured report
        delattr(report, keyword)
    report.save_as(tmp_path / "s" / "report.dcm")
    case = rio.read_case(tmp_path / "s", boxes_override=[[0, 0, 0, 3, 3, 1]])
    assert case.image.shape == (2, 4, 4)
    for name in ("im001.dcm", "im002.dcm"):
        (tmp_path / "s" / name).unlink()
    with pytest.raises(rio.CaseReadError, match="none of the 1 DICOM file"):
        rio.read_case(tmp_path / "s", boxes_override=[[0, 0, 0, 3, 3, 0]])


def test_series_files_accept_extensionless_files_with_the_dicom_preamble(tmp_path):
    _write_slice(tmp_path / "IM0001", np.zeros((4, 4), np.int16))
    _write_slice(tmp_path / "IM0002.dcm", np.zeros((4, 4), np.int16), (0, 0, 1.0))
    (tmp_path / "DICOMDIR.txt").write_text("not a slice")
    (tmp_path / ".hidden.dcm").write_bytes(b"")
    assert [p.name for p in series_files(tmp_path)] == ["IM0001", "IM0002.dcm"]


def test_int8_calibration_reads_dicom_series_and_files_without_sidecars(tmp_path):
    from rep_medsam_jax.export import quantize

    stored = np.random.default_rng(5).integers(900, 1300, (6, 20, 24)).astype(np.int16)
    _series(tmp_path / "series", stored, [2.0 * z for z in range(6)])
    _write_slice(tmp_path / "single.dcm", stored[0], modality="DX", intercept=0.0)
    images = quantize.load_calibration_images(tmp_path, count=8, size=64)
    assert images.shape == (5, 64, 64, 3)            # the 2D file + 4 slices of the series


def test_2d_colour_dicom_is_read_as_rgb(tmp_path):
    # pydicom's test file: a JPEG baseline YBR_FULL image whose top rows are pure red.
    source = pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    shutil.copy(source, tmp_path / "colour.dcm")
    image = rio.read_case(tmp_path / "colour.dcm", boxes_override=[[0, 0, 10, 10]]).image
    assert image.shape == (100, 100, 3) and image.dtype == np.uint8
    red, green, blue = image[0, 0].astype(int)
    assert red > 240 and green < 15 and blue < 15


def test_transfer_syntaxes_decode_to_the_same_image_or_fail_clearly(tmp_path):
    # pydicom's MR_small in several encodings: the lossless ones must give identical pixels.
    names = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
             "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"]
    images = []
    for name in names:
        shutil.copy(pydicom.data.get_testdata_file(name), tmp_path / name)
        images.append(rio.read_case(tmp_path / name, boxes_override=[[0, 0, 5, 5]]).image)
    for name, image in zip(names[1:], images[1:]):
        np.testing.assert_array_equal(image, images[0], err_msg=name)
    # JPEG-LS needs a decoder plug-in (pylibjpeg / gdcm) that the pinned install lacks: then
    # the case fails with the transfer syntax named; with a plug-in it must decode identically.
    shutil.copy(pydicom.data.get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "ls.dcm")
    try:
        image = rio.read_case(tmp_path / "ls.dcm", boxes_override=[[0, 0, 5, 5]]).image
    except rio.CaseReadError as err:
        assert "cannot decode the pixel data (transfer syntax 1.2.840.10008.1.2.4.80)" in str(err)
    else:
        np.testing.assert_array_equal(image, images[0])
