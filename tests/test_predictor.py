"""The case procedures (the authors' inference with the fixes of docs/differences.md), the
folder runner and the backends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from input_pipeline.phantoms import make_case_2d, make_case_3d, save_challenge_case
from rep_medsam_jax.postprocess import logits_to_mask
from rep_medsam_jax.predictor.cases import predict_2d, predict_3d
from rep_medsam_jax.predictor.run import predict_folder
from rep_medsam_jax.preprocess import preprocess_image


class ThresholdBackend:
    """A stand-in model with a known answer: foreground = bright pixels inside the box.

    ``encode`` keeps the image at the embedding resolution (the first channel, every 4th
    pixel); ``decode`` returns +1 logits where that grid is brighter than 0.5 inside the box and
    -1 elsewhere, upsampled x4 to the 256 frame. Counts calls, to check the caching rules.
    """

    image_size = 256

    def __init__(self):
        self.encoded = 0
        self.decode_calls = 0
        self.boxes_decoded = 0

    def encode(self, images):
        self.encoded += len(images)
        return images[:, ::4, ::4, :1].astype(np.float32)

    def decode(self, embedding, boxes):
        self.decode_calls += 1
        self.boxes_decoded += len(boxes)
        bright = np.repeat(np.repeat(embedding[0, :, :, 0] > 0.5, 4, 0), 4, 1)
        ys, xs = np.mgrid[0:256, 0:256]
        logits = []
        for x0, y0, x1, y1 in boxes:
            inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
            logits.append(np.where(bright & inside, 1.0, -1.0))
        return np.stack(logits).astype(np.float32), np.zeros(len(boxes), np.float32)


def _bright_volume(depth=6, size=64, slices=range(0, 4)):
    volume = np.zeros((depth, size, size), np.uint8)
    for z in slices:
        volume[z, 16:48, 20:40] = 200
    return volume


def test_2d_boxes_decoded_in_batches_and_painted_in_order():
    image = np.zeros((100, 140, 3), np.uint8)
    image[20:60, 30:90] = 255
    boxes = np.array([[0, 0, 139, 99], [50, 30, 80, 55]] + [[0, 0, 10, 10]] * 18)
    backend = ThresholdBackend()
    segs = predict_2d(backend, image, boxes)
    assert backend.encoded == 1
    assert backend.decode_calls == 2            # 20 boxes in chunks of 16
    assert segs.dtype == np.uint8 and segs.shape == (100, 140)
    # Box 2 is inside box 1's mask and painted later: it wins there.
    assert segs[40, 60] == 2 and segs[25, 35] == 1 and segs[80, 120] == 0


def test_2d_more_than_255_boxes_gives_uint16_labels():
    image = np.full((64, 64, 3), 255, np.uint8)
    image[-1, -1] = 0                                   # not constant: min-max keeps it bright
    boxes = np.array([[i % 60, i // 60, i % 60 + 2, i // 60 + 2] for i in range(300)])
    segs = predict_2d(ThresholdBackend(), image, boxes)
    assert segs.dtype == np.uint16 and segs.max() == 300


def test_3d_slice_zero_is_segmented_when_the_box_starts_there():
    # baseline_infer.py stopped its downward loop at slice 1 (docs/differences.md): fixed.
    volume = _bright_volume()
    segs = predict_3d(ThresholdBackend(), volume, np.array([[18, 14, 0, 42, 50, 3]]))
    assert segs[0].any() and segs[1].any() and segs[3].any()
    assert not segs[4].any() and not segs[5].any()      # closed range 0..3 only


def test_3d_each_slice_encoded_once_however_many_boxes():
    volume = _bright_volume(depth=8, slices=range(0, 8))
    boxes = np.array([[18, 14, 0, 42, 50, 5], [18, 14, 2, 42, 50, 7], [0, 0, 3, 63, 63, 4]])
    backend = ThresholdBackend()
    predict_3d(backend, volume, boxes)
    assert backend.encoded == 8                          # slices 0..7, once each
    assert backend.boxes_decoded == 6 + 6 + 2            # one decode per box per slice


def test_3d_propagation_follows_the_previous_mask():
    # The object moves across slices; the middle slice's box only covers where it starts. Each
    # next slice's prompt is the previous mask's bbox + 3 px, so the mask tracks the object.
    # At 256 x 256 the 3-px expansion is 3 original pixels, more than the 2-px step per slice.
    volume = np.zeros((5, 256, 256), np.uint8)
    for z in range(5):
        volume[z, 80:160, 40 + 2 * z:100 + 2 * z] = 220
    segs = predict_3d(ThresholdBackend(), volume, np.array([[40, 70, 0, 100, 170, 4]]))
    assert segs[2, 120, 100] == 1 and segs[2, 120, 102] == 0     # the middle slice: the box
    assert segs[4, 120, 105] == 1        # x = 105 lies outside the original box (x1 = 100)
    assert segs[0, 120, 46] == 1 and segs[0, 120, 36] == 0


def test_bright_rectangles_segmented_by_the_threshold_backend_match_their_labels():
    # Rectangles with even edges: the backend's 4-px grid at 256 is every 2nd pixel at 128, so
    # its answer is known exactly. A bright patch outside every box stays background.
    image = np.full((128, 128, 3), 20, np.uint8)
    expected = np.zeros((128, 128), np.uint8)
    rectangles = [(10, 20, 40, 50), (60, 30, 100, 44), (70, 80, 90, 120)]   # y0, x0, y1, x1
    for label, (y0, x0, y1, x1) in enumerate(rectangles, start=1):
        image[y0:y1, x0:x1] = 230
        expected[y0:y1, x0:x1] = label
    image[110:120, 4:14] = 230
    boxes = np.array([[x0 - 4, y0 - 4, x1 + 3, y1 + 3] for y0, x0, y1, x1 in rectangles])
    segs = predict_2d(ThresholdBackend(), image, boxes)
    np.testing.assert_array_equal(segs, expected)


def _write_bad_cases(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    good = np.zeros((40, 50, 3), np.uint8)
    good[10:30, 10:40] = 200
    np.savez(folder / "2DBox_good.npz", imgs=good, boxes=np.array([[5, 5, 45, 35]]))
    (folder / "2DBox_unreadable.npz").write_bytes(b"this is not a zip file")
    np.savez(folder / "2DBox_missing_boxes.npz", imgs=good)
    np.savez(folder / "2DBox_box_outside.npz", imgs=good, boxes=np.array([[5, 5, 80, 35]]))
    np.savez(folder / "2DBox_empty.npz", imgs=np.zeros((0, 50, 3), np.uint8),
             boxes=np.array([[0, 0, 1, 1]]))
    nan_image = good.astype(np.float32)
    nan_image[0, 0, 0] = np.nan
    np.savez(folder / "2DBox_nan.npz", imgs=nan_image, boxes=np.array([[5, 5, 45, 35]]))


def test_bad_cases_are_reported_and_skipped_and_leave_no_output(tmp_path):
    _write_bad_cases(tmp_path / "in")
    summary = predict_folder(ThresholdBackend(), tmp_path / "in", tmp_path / "out",
                             show_progress=False)
    failed = {r.name: r.error for r in summary.failures}
    assert set(failed) == {"2DBox_unreadable.npz", "2DBox_missing_boxes.npz",
                           "2DBox_box_outside.npz", "2DBox_empty.npz", "2DBox_nan.npz"}
    assert "boxes" in failed["2DBox_missing_boxes.npz"]
    assert "box 1" in failed["2DBox_box_outside.npz"]
    assert "NaN" in failed["2DBox_nan.npz"] or "finite" in failed["2DBox_nan.npz"]
    assert sorted(os.listdir(tmp_path / "out")) == ["2DBox_good.npz"]
    segs = np.load(tmp_path / "out" / "2DBox_good.npz")["segs"]
    assert segs.shape == (40, 50) and segs[20, 20] == 1
    assert "1 of 6 case(s) segmented" in summary.report()


def test_png_with_json_sidecar_and_missing_boxes(tmp_path):
    import cv2

    folder = tmp_path / "in"
    folder.mkdir()
    image = np.zeros((48, 64, 3), np.uint8)
    image[10:30, 20:50] = 255
    cv2.imwrite(str(folder / "a.png"), image)
    (folder / "a.json").write_text(json.dumps({"boxes": [[15, 5, 55, 35]]}))
    cv2.imwrite(str(folder / "b.png"), image)          # no sidecar: a clear error
    summary = predict_folder(ThresholdBackend(), folder, tmp_path / "out", show_progress=False)
    assert [r.name for r in summary.failures] == ["b.png"]
    assert "b.json" in summary.failures[0].error or "box" in summary.failures[0].error
    written = cv2.imread(str(tmp_path / "out" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert written.shape == (48, 64) and written[20, 30] == 1 and written[40, 5] == 0


# --- real backends -------------------------------------------------------------------------

def _label_dice(a: np.ndarray, b: np.ndarray) -> list[float]:
    scores = []
    for label in range(1, int(max(a.max(), b.max())) + 1):
        x, y = a == label, b == label
        total = x.sum() + y.sum()
        scores.append(1.0 if total == 0 else 2 * np.logical_and(x, y).sum() / total)
    return scores


def test_onnx_and_jax_backends_give_the_same_masks(tiny_model_dir, tiny_export_dir):
    from rep_medsam_jax.predictor.backend import open_backend

    onnx_backend = open_backend(tiny_export_dir, "onnx")
    jax_backend = open_backend(tiny_model_dir, "jax")
    rng = np.random.default_rng(11)
    image, _, boxes = make_case_2d(rng, "Endoscopy", 160)
    volume, _, boxes3d, _ = make_case_3d(rng, "MR", (8, 72, 96))
    tensor = preprocess_image(image)[0][None]
    # Embeddings of largest |value| about 4.5; measured 2e-4 on this phantom.
    np.testing.assert_allclose(onnx_backend.encode(tensor), jax_backend.encode(tensor),
                               rtol=0, atol=1e-3)
    for a, b in [(predict_2d(onnx_backend, image, boxes), predict_2d(jax_backend, image, boxes)),
                 (predict_3d(onnx_backend, volume, boxes3d),
                  predict_3d(jax_backend, volume, boxes3d))]:
        assert min(_label_dice(a, b)) >= 0.999
        assert a.any()                                   # the comparison is not vacuous


def _predict_3d_box_by_box(backend, volume, boxes):
    """The authors' 3D propagation written plainly, the independent reference for the batched
    sweeps: each box in turn, every slice encoded afresh, one decode per box per slice,
    painted in box order."""
    import cv2

    depth, height, width = volume.shape
    ratio = 256 / max(height, width)
    segs = np.zeros(volume.shape, np.uint8)
    for index, box in enumerate(boxes):
        label = index + 1
        z_min, z_max = max(int(box[2]), 0), min(int(box[5]), depth - 1)
        if z_min > z_max:
            continue
        middle = np.trunc(box[[0, 1, 3, 4]].astype(np.float64) * ratio).astype(np.float32)
        z_mid = min(max(int((int(box[5]) - int(box[2])) / 2 + int(box[2])), z_min), z_max)
        masks = {}

        def segment(z, previous):
            prompt = middle
            if previous is not None:
                painted = masks[previous].astype(np.uint8) * np.uint8(label)
                small = cv2.resize(painted, (int(width * ratio + 0.5), int(height * ratio + 0.5)),
                                   interpolation=cv2.INTER_AREA)
                rows, cols = np.nonzero(small)
                if rows.size:
                    prompt = np.array([max(0, cols.min() - 3), max(0, rows.min() - 3),
                                       min(255, cols.max() + 3), min(255, rows.max() + 3)],
                                      np.float32)
            tensor, new_hw = preprocess_image(np.repeat(volume[z][:, :, None], 3, -1))
            logits, _ = backend.decode(backend.encode(tensor[None]), prompt[None])
            masks[z] = logits_to_mask(logits, new_hw, (height, width))[0]

        segment(z_mid, None)
        for z in range(z_mid + 1, z_max + 1):
            segment(z, z - 1)
        for z in range(z_mid - 1, z_min - 1, -1):
            segment(z, z + 1)
        for z, mask in masks.items():
            segs[z][mask] = label
    return segs


def test_3d_batched_sweeps_give_exactly_the_box_by_box_result(tiny_export_dir, monkeypatch):
    from rep_medsam_jax.predictor import cases
    from rep_medsam_jax.predictor.backend import open_backend

    # One slice per encoder call on both sides: batched encoding moves embeddings by ~1e-6,
    # enough to flip a pixel of these random-weight masks; this test is about the decodes.
    monkeypatch.setattr(cases, "ENCODE_CHUNK", 1)
    backend = open_backend(tiny_export_dir, "onnx")
    volume, _, _, _ = make_case_3d(np.random.default_rng(8), "MR", (10, 72, 96))
    boxes = np.array([[10, 8, 0, 80, 60, 4],       # starts at slice 0
                      [20, 15, 2, 90, 70, 8],      # overlaps the first in x, y and z
                      [5, 30, 5, 60, 71, 14],      # runs past the depth (clipped to 9)
                      [30, 10, 3, 70, 50, 3],      # a single slice
                      [0, 0, 1, 95, 71, 9],        # the whole volume, painted last but one
                      [40, 20, 12, 60, 40, 15]])   # wholly outside the volume: paints nothing
    calls = []
    decode = backend.decode
    backend.decode = lambda embedding, prompts: calls.append(len(prompts)) or decode(
        embedding, prompts)
    batched = predict_3d(backend, volume, boxes)
    backend.decode = decode
    reference = _predict_3d_box_by_box(backend, volume, boxes)
    np.testing.assert_array_equal(batched, reference)
    assert set(np.unique(reference)) >= {0, 1, 2, 3}     # not vacuous: several boxes show
    assert sum(calls) == 5 + 7 + 5 + 1 + 9               # one decode per box per slice...
    assert len(calls) == 8 + 9        # ...but one call per slice and sweep: up 2..9, down 8..0


def test_onnx_batches_split_over_side_by_side_sessions_give_the_one_session_result(
        tiny_export_dir):
    """A batch of slices is split over sessions of threads // parts threads each: the same
    embeddings, in the same order, as one session running the whole batch."""
    from rep_medsam_jax.predictor.onnx_backend import OnnxBackend

    backend = OnnxBackend(tiny_export_dir / "encoder.onnx", tiny_export_dir / "decoder.onnx",
                          threads=2)
    images = np.random.default_rng(3).random((5, 256, 256, 3), dtype=np.float32)
    whole = backend._encoder.run(None, {backend._encoder_input: images})[0]
    split = backend.encode(images)
    assert len(backend._split_encoders[2]) == 2                 # 5 images over 2 sessions
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(backend.encode(images[2:3]), whole[2:3], rtol=0, atol=1e-5)
    assert list(backend._split_encoders) == [2]          # one image ran on the main session


def test_onnx_predict_imports_neither_jax_nor_torch(tiny_export_dir, tmp_path):
    rng = np.random.default_rng(5)
    save_challenge_case(tmp_path / "in", tmp_path / "gts", "2DBox_CT_0000",
                        make_case_2d(rng, "CT", 96))
    script = f"""
import sys
from rep_medsam_jax.cli import main
code = main(["predict", "-i", {str(tmp_path / 'in')!r}, "-o", {str(tmp_path / 'out')!r},
             "--model", {str(tiny_export_dir)!r}, "-q"])
heavy = sorted(m for m in ("jax", "jaxlib", "flax", "torch", "tensorflow") if m in sys.modules)
print("HEAVY", heavy)
sys.exit(code)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert (tmp_path / "out" / "2DBox_CT_0000.npz").is_file()


def test_cli_predict_and_evaluate_end_to_end(tiny_export_dir, tmp_path, capsys):
    from input_pipeline.phantoms import write_phantom_dataset
    from rep_medsam_jax.cli import main

    data = write_phantom_dataset(tmp_path / "data", n2d=2, n3d=1, seed=4,
                                 size_2d=96, shape_3d=(6, 64, 64))
    assert main(["predict", "-i", str(data.inputs_dir), "-o", str(tmp_path / "pred"),
                 "--model", str(tiny_export_dir), "--overlay", str(tmp_path / "png"),
                 "-q"]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 3
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(data.gts_dir),
                 "-o", str(tmp_path / "metrics.csv")]) == 0
    lines = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert lines[0] == "case,dsc,nsd" and len(lines) == 4
    assert main(["predict", "-i", str(data.inputs_dir), "-o", str(tmp_path / "pred2"),
                 "--model", str(tmp_path / "nowhere"), "-q"]) == 2
    assert "no such model" in capsys.readouterr().err
    # One case file as the input; a bad input is reported before any model is opened.
    one = sorted(data.inputs_dir.iterdir())[0]
    assert main(["predict", "-i", str(one), "-o", str(tmp_path / "one"),
                 "--model", str(tiny_export_dir), "-q"]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == [one.name]
    (tmp_path / "notes.txt").write_text("x")
    for bad, words in ((tmp_path / "notes.txt", "unsupported file type"),
                       (tmp_path / "missing", "no such file or folder")):
        assert main(["predict", "-i", str(bad), "-o", str(tmp_path / "bad"),
                     "--model", str(tmp_path / "nowhere"), "-q"]) == 2
        assert words in capsys.readouterr().err


def test_openvino_backend_gives_the_onnx_masks(tiny_export_dir):
    pytest.importorskip("openvino")
    from rep_medsam_jax.predictor.backend import open_backend

    onnx_backend = open_backend(tiny_export_dir, "onnx")
    openvino_backend = open_backend(tiny_export_dir, "openvino")
    image, _, boxes = make_case_2d(np.random.default_rng(2), "MR", 128)
    a, b = predict_2d(onnx_backend, image, boxes), predict_2d(openvino_backend, image, boxes)
    assert min(_label_dice(a, b)) >= 0.99 and a.any()


def test_cli_modality_and_ct_window_apply_to_nifti_cases_without_sidecars(tmp_path, capsys,
                                                                         monkeypatch):
    import nibabel as nib

    from rep_medsam_jax import cli
    from rep_medsam_jax.predictor import backend as backend_module

    # Air (-1000 HU), a soft-tissue block (100 HU) and a bone block (1000 HU). As CT (window
    # 40 / 400) the soft tissue is bright (165 of 255); under the percentile rule (the default
    # without a modality) the soft tissue sits at the low percentile and maps to 0.
    hu = np.full((32, 32, 4), -1000, np.int16)
    hu[4:14, 4:28] = 100
    hu[18:28, 4:28] = 1000
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(hu, np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "in" / "ct.nii.gz")
    monkeypatch.setattr(backend_module, "open_backend", lambda *a, **k: ThresholdBackend())
    box = "0 0 0 31 31 3"

    def soft_tissue_voxels(*flags):
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        assert cli.main(["predict", "-i", str(tmp_path / "in"), "-o", str(out), "--model", str(tmp_path),
                         "--box", box, "-q", *flags]) == 0
        labels = np.asarray(nib.load(out / "ct.nii.gz").dataobj)
        return int(labels[4:14, 4:28].astype(bool).sum()), int(labels[18:28, 4:28].sum() > 0)

    assert soft_tissue_voxels() == (0, 1)
    assert "note ct.nii.gz: no modality given and values reach -1000" in capsys.readouterr().out
    assert soft_tissue_voxels("--modality", "CT") == (10 * 24 * 4, 1)
    assert "note" not in capsys.readouterr().out
    # A window of level 1000 / width 400 ([800, 1200]) leaves only the bone bright.
    assert soft_tissue_voxels("--modality", "ct", "--ct-window", "1000", "400") == (0, 1)
    assert cli.main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"),
                     "--model", str(tmp_path), "--ct-window", "40", "0"]) == 2
    assert "width must be positive" in capsys.readouterr().err
