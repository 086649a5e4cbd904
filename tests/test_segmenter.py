"""rep_medsam_jax.Segmenter: the masks of `rep-medsam predict`, box by box and slice by slice, and
a slice-embedding cache that keeps to its byte bound."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from input_pipeline.phantoms import make_case_2d, make_case_3d
from rep_medsam_jax.cli import main
from rep_medsam_jax.postprocess import paint_labels
from rep_medsam_jax.predictor.run import predict_folder
from rep_medsam_jax.predictor.segmenter import Cancelled, EmbeddingCache, Segmenter

REPO = Path(__file__).resolve().parents[1]


class CountingBackend:
    """A real backend that counts the slices it encodes."""

    def __init__(self, backend):
        self._backend = backend
        self.image_size = backend.image_size
        self.encoded: list[int] = []          # batch sizes, in call order

    def encode(self, images):
        self.encoded.append(len(images))
        return self._backend.encode(images)

    def decode(self, embedding, boxes):
        return self._backend.decode(embedding, boxes)


class ImageInEmbedding:
    """The tiny model with the image written into its embedding: a random tiny encoder may
    give nearly the same embedding for every image, and then a slice mixed up with another
    would go unnoticed. The image, pooled to the embedding grid, is added to every channel."""

    def __init__(self, backend):
        self._backend = backend
        self.image_size = backend.image_size

    def encode(self, images):
        embeddings = self._backend.encode(images)
        batch, grid, _, _ = embeddings.shape
        factor = images.shape[1] // grid
        pooled = images.reshape(batch, grid, factor, grid, factor, 3).mean(axis=(2, 4, 5))
        return embeddings + 4.0 * (pooled[..., None] - 0.5)

    def decode(self, embedding, boxes):
        return self._backend.decode(embedding, boxes)


# predict and the segmenter both encode one slice per call (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("predict_encodes_one_slice_per_call")


@pytest.fixture(scope="module")
def onnx_backend(tiny_export_dir):
    from rep_medsam_jax.predictor.backend import open_backend

    return ImageInEmbedding(open_backend(tiny_export_dir, "onnx"))


def _case_dir(tmp_path: Path, name: str, **arrays) -> Path:
    inputs = tmp_path / f"in_{name}"
    inputs.mkdir()
    np.savez(inputs / f"{name}.npz", **arrays)
    return inputs


def _cli_predict(tmp_path: Path, name: str, export_dir: Path, **arrays) -> np.ndarray:
    """`rep-medsam predict` on one challenge npz case -> its label map."""
    inputs, outputs = _case_dir(tmp_path, name, **arrays), tmp_path / f"out_{name}"
    assert main(["predict", "-i", str(inputs), "-o", str(outputs), "--model",
                 str(export_dir), "-q"]) == 0
    return np.load(outputs / f"{name}.npz")["segs"]


def _predict(tmp_path: Path, name: str, backend, **arrays) -> np.ndarray:
    """What `rep-medsam predict` runs (:func:`predict_folder`), on ``backend``."""
    inputs, outputs = _case_dir(tmp_path, name, **arrays), tmp_path / f"out_{name}"
    summary = predict_folder(backend, inputs, outputs, show_progress=False)
    assert not summary.failures, summary.report()
    return np.load(outputs / f"{name}.npz")["segs"]


def test_image_masks_are_the_masks_predict_paints(tiny_export_dir, tmp_path):
    rng = np.random.default_rng(21)
    image, _, _ = make_case_2d(rng, "Endoscopy", (150, 200))
    # 20 boxes: more than one decoder call (16 per call), some overlapping.
    corners = rng.integers(0, 120, (20, 2))
    boxes = np.concatenate([corners, corners + rng.integers(20, 80, (20, 2))], 1)
    boxes = np.minimum(boxes, [200, 150, 200, 150]).astype(float)
    expected = _cli_predict(tmp_path, "2DBox_Endo_0001", tiny_export_dir, imgs=image,
                            boxes=boxes)
    with Segmenter(tiny_export_dir) as seg:
        seg.set_image(image)
        masks, scores = seg.predict(boxes)
        one_mask, one_score = seg.predict(boxes[3])
    assert masks.shape == (20, 150, 200) and masks.dtype == bool and scores.shape == (20,)
    np.testing.assert_array_equal(paint_labels(masks, range(1, 21), (150, 200)), expected)
    assert 0 < masks.sum() < masks.size            # not vacuous: masks neither empty nor full
    np.testing.assert_array_equal(one_mask[0], masks[3])
    np.testing.assert_allclose(one_score, scores[3:4], rtol=0, atol=1e-6)


def test_image_masks_follow_the_image(onnx_backend, tmp_path):
    rng = np.random.default_rng(20)
    image, _, boxes = make_case_2d(rng, "Dermoscopy", (120, 96))
    expected = _predict(tmp_path, "2DBox_Derm_0001", onnx_backend, imgs=image, boxes=boxes)
    with Segmenter(onnx_backend) as seg:
        seg.set_image(np.ascontiguousarray(image[::-1]))      # another image first
        flipped, _ = seg.predict(boxes)
        seg.set_image(image)
        masks, _ = seg.predict(boxes)
    np.testing.assert_array_equal(paint_labels(masks, range(1, len(boxes) + 1), (120, 96)),
                                  expected)
    assert masks.any() and not np.array_equal(flipped, masks)


def test_slice_masks_are_predicts_masks_of_that_slice(onnx_backend, tmp_path):
    rng = np.random.default_rng(22)
    volume, _, _, _ = make_case_3d(rng, "CT", (6, 64, 80))
    boxes = np.array([[11, 13, 51, 41], [30, 20, 70, 60]], float)
    expected = _predict(tmp_path, "2DBox_slice", onnx_backend, imgs=volume[4], boxes=boxes)
    with Segmenter(onnx_backend, prefetch=0) as seg:
        seg.set_volume(volume)
        masks, _ = seg.predict_slice(4, boxes)
    np.testing.assert_array_equal(paint_labels(masks, [1, 2], (64, 80)), expected)
    assert masks.any()


def test_propagation_is_predicts_3d_procedure(onnx_backend, tmp_path):
    rng = np.random.default_rng(23)
    volume, _, _, _ = make_case_3d(rng, "MR", (9, 64, 72))
    boxes = np.array([[8, 10, 1, 40, 44, 6], [20, 16, 3, 60, 50, 8]])
    expected = _predict(tmp_path, "3DBox_MR_0001", onnx_backend, imgs=volume, boxes=boxes)
    counting = CountingBackend(onnx_backend)
    with Segmenter(counting, prefetch=0) as seg:
        seg.set_volume(volume)
        seen = []
        single = seg.propagate(boxes[0], progress=lambda done, total: seen.append(done))
        labels = seg.propagate(boxes)
    expected_single = _predict(tmp_path, "3DBox_MR_0002", onnx_backend, imgs=volume,
                               boxes=boxes[:1])
    np.testing.assert_array_equal(single, expected_single == 1)
    assert single[1:7].any() and not single[[0, 7, 8]].any()     # the z range, not beyond
    np.testing.assert_array_equal(labels, expected)
    # Slices 1..6 were encoded once by the first call; the second only adds 7 and 8.
    assert counting.encoded == [1] * 8
    assert seen == sorted(seen) and seen[-1] == 2 * 6


def test_cached_slices_give_the_same_propagation(onnx_backend, tmp_path):
    """Slices encoded one by one (in the background, or by a box drawn on them) feed the
    propagation as predict's batches of slices do."""
    rng = np.random.default_rng(24)
    volume, _, _, _ = make_case_3d(rng, "CT", (7, 48, 64))
    box = np.array([6, 8, 0, 40, 40, 6])
    expected = _predict(tmp_path, "3DBox_CT_0001", onnx_backend, imgs=volume, boxes=box[None])
    counting = CountingBackend(onnx_backend)
    with Segmenter(counting, prefetch=0) as seg:
        seg.set_volume(volume)
        for z in range(7):
            seg.embedding(z)
        assert counting.encoded == [1] * 7
        mask = seg.propagate(box)
    assert counting.encoded == [1] * 7                    # nothing encoded again
    np.testing.assert_array_equal(mask, expected == 1)


def test_embedding_cache_keeps_to_its_bound_least_recently_used_out():
    item = np.zeros(100, np.float32)                     # 400 bytes
    cache = EmbeddingCache(max_bytes=1000)
    for key in (b"a", b"b"):
        cache.put(key, item.copy())
    assert cache.get(b"a") is not None                   # a is now the most recent
    cache.put(b"c", item.copy())
    assert cache.nbytes == 800 and len(cache) == 2
    assert b"b" not in cache and b"a" in cache and b"c" in cache
    cache.put(b"big", np.zeros(300, np.float32))         # larger than the bound: not kept
    assert b"big" not in cache and cache.nbytes == 800
    with pytest.raises(ValueError):
        EmbeddingCache(-1)


def test_segmenter_cache_bound_in_bytes_and_reencodes_evicted_slices(onnx_backend):
    counting = CountingBackend(onnx_backend)
    volume = np.random.default_rng(25).integers(0, 255, (6, 40, 40), np.uint8)
    one = onnx_backend.encode(np.zeros((1, 256, 256, 3), np.float32)).nbytes
    box = np.array([5, 5, 30, 30])
    with Segmenter(counting, cache_bytes=3 * one, prefetch=0) as seg:
        seg.set_volume(volume)
        first = {z: seg.predict_slice(z, box)[0] for z in range(6)}
        assert len(seg.cache) == 3 and seg.cache.nbytes == 3 * one
        assert [seg.is_cached(z) for z in range(6)] == [False] * 3 + [True] * 3
        seg.predict_slice(4, box)
        assert sum(counting.encoded) == 6                # a cached slice: no encode
        again = seg.predict_slice(0, box)[0]             # evicted: encoded again, same mask
        assert sum(counting.encoded) == 7
        np.testing.assert_array_equal(again, first[0])
        assert not seg.is_cached(3) and seg.is_cached(4)   # 3 was the least recently used


def test_background_encodes_the_neighbours_when_idle(onnx_backend):
    counting = CountingBackend(onnx_backend)
    volume = np.random.default_rng(26).integers(0, 255, (8, 32, 32), np.uint8)
    with Segmenter(counting, prefetch=2, idle_s=0.05) as seg:
        seg.set_volume(volume)
        seg.predict_slice(3, np.array([2, 2, 20, 20]))
        deadline = time.monotonic() + 30
        while not all(seg.is_cached(z) for z in (1, 2, 4, 5)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [seg.is_cached(z) for z in range(8)] == [False, True, True, True, True, True,
                                                         False, False]
        time.sleep(0.2)
        assert counting.encoded == [1] * 5          # slice 3, then its neighbours, one by one
        seg.focus(7)                                # looking at slice 7: it comes first
        deadline = time.monotonic() + 30
        while not seg.is_cached(7) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seg.is_cached(7)


def test_propagation_can_be_cancelled(onnx_backend):
    volume = np.random.default_rng(27).integers(0, 255, (6, 32, 32), np.uint8)
    cancel = threading.Event()
    with Segmenter(onnx_backend, prefetch=0) as seg:
        seg.set_volume(volume)

        def progress(done, total):
            if done >= 3:
                cancel.set()

        with pytest.raises(Cancelled):
            seg.propagate(np.array([2, 2, 0, 20, 20, 5]), progress=progress, cancel=cancel)
        cancel.clear()
        assert seg.propagate(np.array([2, 2, 0, 20, 20, 5])).shape == (6, 32, 32)


def test_bad_inputs_are_clear_errors(onnx_backend):
    with Segmenter(onnx_backend, prefetch=0) as seg:
        with pytest.raises(RuntimeError, match="set_image"):
            seg.predict(np.array([0, 0, 5, 5]))
        with pytest.raises(ValueError, match="uint8"):
            seg.set_image(np.zeros((8, 8, 3), np.float32))
        seg.set_volume(np.zeros((3, 16, 16), np.uint8))
        with pytest.raises(RuntimeError, match="predict_slice"):
            seg.predict(np.array([0, 0, 5, 5]))
        with pytest.raises(IndexError):
            seg.predict_slice(3, np.array([0, 0, 5, 5]))
        with pytest.raises(ValueError, match=r"\(N, 6\)"):
            seg.propagate(np.array([0, 0, 5, 5]))


def test_segmenter_on_onnx_imports_neither_jax_nor_torch(tiny_export_dir):
    script = f"""
import sys
import numpy as np
import rep_medsam_jax
seg = rep_medsam_jax.Segmenter({str(tiny_export_dir)!r})
seg.set_volume(np.zeros((3, 32, 32), np.uint8))
seg.propagate(np.array([2, 2, 0, 20, 20, 2]))
seg.close()
print("HEAVY", sorted(m for m in ("jax", "jaxlib", "flax", "torch") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
