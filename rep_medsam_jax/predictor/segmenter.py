"""Interactive box-prompted segmentation: ``Segmenter``, in the manner of segment-anything's
``SamPredictor``.

    seg = Segmenter("my_export")            # an export folder, a model folder or a store name
    seg.set_image(image)                     # (H, W, 3) uint8: encoded once
    masks, scores = seg.predict(boxes)       # (N, 4) boxes in pixels -> (N, H, W) bool, (N,)

    seg.set_volume(volume)                   # (D, H, W) uint8 (or raw values + modality)
    masks, scores = seg.predict_slice(z, boxes)
    mask = seg.propagate([x0, y0, z0, x1, y1, z1])     # (D, H, W) bool

The numbers are those of ``rep-medsam predict``: the same preprocessing, the same decoder calls
(:func:`~rep_medsam_jax.predictor.cases.decode_boxes`), the same post-processing, and
``propagate`` runs :func:`~rep_medsam_jax.predictor.cases.predict_3d` itself, fed from this
object's embeddings. Slices are encoded one per call, as predict encodes an image; predict
encodes a volume's slices in batches of ``ENCODE_CHUNK``, which onnxruntime may round
differently by ~1e-6 (see ``_embeddings``).

Slice embeddings live in an :class:`EmbeddingCache`, keyed by the slice's pixels (so a volume
opened again, or a slice seen through another object, is not encoded twice) and bounded in
bytes, least recently used out. While the caller is idle, a background thread encodes the
slices next to the last one asked for, nearest first, so scrolling to a neighbour and drawing
a box costs only the decoder. NumPy only: the ONNX path imports neither JAX nor PyTorch.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rep_medsam_jax.predictor.backend import Backend, open_backend
from rep_medsam_jax.predictor.cases import (clip_box_3d, decode_boxes,
                                            predict_3d, slice_tensor)
from rep_medsam_jax.preprocess import (longest_side_size, preprocess_image,
                                       scale_boxes_to_256)

DEFAULT_CACHE_BYTES = 1 << 30     # 1 GiB: 256 slices of the 64 x 64 x 256 float32 embedding
DEFAULT_PREFETCH = 4              # neighbours each side encoded in the background
DEFAULT_IDLE_S = 0.3              # quiet time before the background starts encoding


class Cancelled(Exception):
    """A propagation stopped by its ``cancel`` event."""


class EmbeddingCache:
    """Arrays by key, at most ``max_bytes`` in all, least recently used out. Thread-safe.

    An array larger than the whole bound is returned to its caller but never kept.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key).nbytes
            if value.nbytes > self.max_bytes:
                return
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def pixels_key(pixels: np.ndarray) -> bytes:
    """A digest of an image's shape, dtype and pixels: the cache key of its embedding."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{pixels.shape}{pixels.dtype}".encode())
    digest.update(pixels.data)
    return digest.digest()


def _open_model(model: str | Path, backend: str | None, threads: int | None,
                int8: bool) -> Backend:
    """A path or store name -> a backend; ``backend=None`` picks onnx for an export folder and
    jax for a model folder."""
    from rep_medsam_jax import model_store  # noqa: PLC0415

    if backend is None:
        try:
            path = model_store.resolve(model, "exports")
        except FileNotFoundError:
            path = model_store.resolve(model, "models")
        backend = "jax" if (Path(path) / model_store.MARKERS["models"]).is_file() else "onnx"
    else:
        path = model_store.resolve(model, "models" if backend == "jax" else "exports")
    return open_backend(path, backend, threads=threads, int8=int8)


class _CachedSlices:
    """The slice embeddings one propagation needs, held for its length (whatever the cache
    evicts meanwhile): what :func:`predict_3d` indexes by z."""

    def __init__(self, embeddings: dict[int, np.ndarray], new_hw: tuple[int, int]):
        self._embeddings = embeddings
        self.new_hw = new_hw

    def __getitem__(self, z: int) -> np.ndarray:
        return self._embeddings[z]


class _LockedDecoder:
    """A backend whose decoder calls take the model lock one by one, so that boxes drawn
    during a propagation are decoded between two of its slices."""

    def __init__(self, backend: Backend, lock: threading.Lock):
        self._backend, self._lock = backend, lock
        self.image_size = backend.image_size

    def encode(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._backend.encode(images)

    def decode(self, embedding: np.ndarray, boxes: np.ndarray):
        with self._lock:
            return self._backend.decode(embedding, boxes)


class _Pixels:
    """The image or volume set on a segmenter (never changed: a new one replaces it), with the
    cache keys of its slices, computed when first needed."""

    def __init__(self, array: np.ndarray, image_size: int):
        self.array = array                   # (D, H, W) volume or (1, H, W, 3) image
        self.is_image = array.ndim == 4
        self.depth = len(array)
        self.hw: tuple[int, int] = tuple(array.shape[1:3])
        self.new_hw = longest_side_size(self.hw, image_size)
        self._image_size = image_size
        self._keys: dict[int, bytes] = {}

    def key(self, z: int) -> bytes:
        key = self._keys.get(z)
        if key is None:
            key = self._keys[z] = pixels_key(self.array[z])
        return key

    def tensor(self, z: int) -> np.ndarray:
        """Slice z as the model's (S, S, 3) input, as predict makes it."""
        if self.is_image:
            return preprocess_image(self.array[0], self._image_size)[0]
        return slice_tensor(self.array, z, self._image_size)[0]


class Segmenter:
    """Encode an image or volume once, then turn boxes into masks at decoder speed.

    model: an export folder (onnx / openvino), a model folder (jax), a model store name, or a
        backend object (``encode`` / ``decode``, see :mod:`rep_medsam_jax.predictor.backend`).
    backend: "onnx", "openvino", "jax" or None (by the folder's kind).
    cache_bytes: bound of the slice-embedding cache. prefetch: slices on each side of the last
    one used that are encoded in the background once the caller has been idle ``idle_s``
    seconds (0 turns the background off).

    Methods may be called from several threads: one encode or decode runs at a time, and a
    propagation keeps working on the volume it started with if another one is set meanwhile.
    """

    def __init__(self, model: str | Path | Backend, backend: str | None = None, *,
                 threads: int | None = None, int8: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, prefetch: int = DEFAULT_PREFETCH,
                 idle_s: float = DEFAULT_IDLE_S):
        if hasattr(model, "encode") and hasattr(model, "decode"):
            self.backend: Backend = model
        else:
            self.backend = _open_model(model, backend, threads, int8)
        self.cache = EmbeddingCache(cache_bytes)
        self.prefetch = int(prefetch)
        self.idle_s = float(idle_s)
        self._model_lock = threading.Lock()          # one encode / decode at a time
        self._reset()

    def _reset(self) -> None:
        self._pixels: _Pixels | None = None
        self._focus = 0
        self._last_use = time.monotonic()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._worker: threading.Thread | None = None

    def sibling(self) -> "Segmenter":
        """Another segmenter on the same model, cache and model lock, for another image
        (the app keeps one per open file)."""
        twin = object.__new__(Segmenter)
        twin.backend, twin.cache = self.backend, self.cache
        twin.prefetch, twin.idle_s, twin._model_lock = self.prefetch, self.idle_s, \
            self._model_lock
        twin._reset()
        return twin

    # ---- images ----------------------------------------------------------------------------

    def set_image(self, image: np.ndarray) -> None:
        """(H, W, 3) or (H, W) uint8: encode it (or find it in the cache)."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image must be (H, W) or (H, W, 3) uint8, got {image.shape} "
                             f"{image.dtype}")
        self._set_pixels(np.ascontiguousarray(image)[None])
        self.embedding(0)

    def predict(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 4) or (4,) [x0, y0, x1, y1] in the image's pixels -> ((N, H, W) bool masks,
        (N,) predicted IoU scores), box k's mask being the one ``rep-medsam predict`` paints."""
        self._current(image=True)
        return self.predict_slice(0, boxes)

    # ---- volumes ---------------------------------------------------------------------------

    def set_volume(self, volume: np.ndarray, modality: str | None = None,
                   ct_window: tuple[float, float] | None = None) -> None:
        """(D, H, W) volume. uint8 is used as it is; other values go through the NIfTI
        intensity rule of ``predict`` (CT windowing when ``modality`` is "CT", else
        percentiles). Nothing is encoded until a slice is asked for."""
        volume = np.asarray(volume)
        if volume.ndim != 3 or volume.size == 0:
            raise ValueError(f"a volume must be (D, H, W), got {volume.shape}")
        if volume.dtype != np.uint8:
            from rep_medsam_jax.io import intensities_to_uint8  # noqa: PLC0415

            volume = intensities_to_uint8(volume, modality, ct_window)
        self._set_pixels(np.ascontiguousarray(volume))

    @property
    def depth(self) -> int:
        return self._current().depth

    def focus(self, z: int) -> None:
        """The user is looking at slice z: once idle, encode it, then its neighbours."""
        self._touch(self._current(), z)

    def predict_slice(self, z: int, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 4) or (4,) in pixels on slice z -> ((N, H, W) bool, (N,) scores)."""
        pixels = self._current()
        boxes = np.asarray(boxes, dtype=np.float64)
        boxes = boxes[None] if boxes.ndim == 1 else boxes
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (N, 4) [x0, y0, x1, y1], got {boxes.shape}")
        embedding = self._embedding(pixels, z)
        prompts = scale_boxes_to_256(boxes, pixels.hw, self.backend.image_size)
        with self._model_lock:
            masks, scores = decode_boxes(self.backend, embedding, prompts.astype(np.float32),
                                         pixels.new_hw, pixels.hw)
        self._touch(pixels, z)
        return masks, scores

    def propagate(self, boxes_3d: np.ndarray,
                  progress: Callable[[int, int], None] | None = None,
                  cancel: threading.Event | None = None) -> np.ndarray:
        """``predict``'s 3D procedure: each box prompts its middle slice, then every slice up
        and down prompts from the box of the mask before it.

        boxes_3d: (6,) [x0, y0, z0, x1, y1, z1] (voxels of the (D, H, W) array, z closed) ->
        (D, H, W) bool; or (N, 6) -> (D, H, W) label map as ``predict`` writes it.
        progress(done, total) is called after each encoded slice and each decoded one;
        setting ``cancel`` stops the work with :class:`Cancelled`.
        """
        pixels = self._current()
        boxes = np.asarray(boxes_3d)
        single = boxes.ndim == 1
        boxes = boxes[None] if single else boxes
        if pixels.is_image or boxes.ndim != 2 or boxes.shape[1] != 6:
            raise ValueError(f"3D boxes must be (N, 6) [x0, y0, z0, x1, y1, z1] on a volume, "
                             f"got {np.asarray(boxes_3d).shape}")
        needed = sorted({z for box in boxes
                         for z in range(*_closed(clip_box_3d(box, pixels.depth)))})
        # Encodes, then one decode call per slice (exact for one box; several boxes may share
        # or split slices between the sweeps, so the count is capped).
        total = 2 * len(needed)
        done = 0

        def step(count: int = 1) -> None:
            nonlocal done
            if cancel is not None and cancel.is_set():
                raise Cancelled("propagation cancelled")
            done = min(done + count, total)
            if progress is not None:
                progress(done, total)

        embeddings = self._embeddings(pixels, needed, step)
        labels = predict_3d(_LockedDecoder(self.backend, self._model_lock), pixels.array, boxes,
                            progress=lambda z: step(),
                            embeddings=_CachedSlices(embeddings, pixels.new_hw))
        self._touch(pixels, needed[len(needed) // 2] if needed else self._focus)
        return labels == 1 if single else labels

    # ---- embeddings ------------------------------------------------------------------------

    def embedding(self, z: int) -> np.ndarray:
        """Slice z's (1, h, w, C) embedding, from the cache or encoded now."""
        pixels = self._current()
        embedding = self._embedding(pixels, z)
        self._touch(pixels, z)
        return embedding

    def is_cached(self, z: int) -> bool:
        """Whether slice z's embedding is in the cache (asking is no activity)."""
        pixels = self._pixels
        return pixels is not None and pixels.key(z) in self.cache

    def _embedding(self, pixels: _Pixels, z: int) -> np.ndarray:
        if not 0 <= z < pixels.depth:
            raise IndexError(f"slice {z} outside 0..{pixels.depth - 1}")
        return self._embeddings(pixels, [z])[z]

    def _embeddings(self, pixels: _Pixels, slices: list[int],
                    step: Callable[[int], None] | None = None) -> dict[int, np.ndarray]:
        """Embeddings of ``slices``: the cached ones as they are, the others encoded and cached.

        One slice per encoder call, wherever the slice is first needed (a box, the
        background, a propagation): an embedding does not depend on how it was reached.
        onnxruntime runs a batch of slices over several sessions with fewer threads each,
        which moves an embedding by ~1e-6 (enough to flip a boundary pixel of a
        random-weight mask), so batches would make a cached slice differ from a fresh one.
        """
        found = {z: self.cache.get(pixels.key(z)) for z in slices}
        missing = [z for z, value in found.items() if value is None]
        if step is not None and len(slices) > len(missing):
            step(len(slices) - len(missing))
        for z in missing:
            with self._model_lock:
                found[z] = self.backend.encode(pixels.tensor(z)[None])
            self.cache.put(pixels.key(z), found[z])
            if step is not None:
                step(1)
        return found

    def _set_pixels(self, array: np.ndarray) -> None:
        self._pixels = _Pixels(array, self.backend.image_size)
        self._focus = 0                 # nothing is encoded before a slice is asked for

    def _current(self, image: bool = False) -> _Pixels:
        """The image in use; marks the caller active, so the background waits."""
        self._last_use = time.monotonic()
        pixels = self._pixels
        if pixels is None:
            raise RuntimeError("no image: call set_image or set_volume first")
        if image and not pixels.is_image:
            raise RuntimeError("a volume is set: use predict_slice(z, boxes) or propagate")
        return pixels

    # ---- background encoding ---------------------------------------------------------------

    def _touch(self, pixels: _Pixels, z: int) -> None:
        """Note the caller's activity at slice z; wake the background encoder."""
        self._focus = z
        self._last_use = time.monotonic()
        if self.prefetch > 0 and not pixels.is_image and not self._stopped.is_set():
            if self._worker is None:
                self._worker = threading.Thread(target=self._prefetch_loop, daemon=True,
                                                name="segmenter-prefetch")
                self._worker.start()
            self._wake.set()

    def _next_to_prefetch(self, pixels: _Pixels | None) -> int | None:
        if pixels is None or pixels.is_image:
            return None
        focus = self._focus
        for distance in range(self.prefetch + 1):     # the slice in view first
            for z in (focus + distance, focus - distance):
                if 0 <= z < pixels.depth and pixels.key(z) not in self.cache:
                    return z
        return None

    def _prefetch_loop(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait()
            quiet = time.monotonic() - self._last_use
            if quiet < self.idle_s:
                self._stopped.wait(self.idle_s - quiet)
                continue
            pixels = self._pixels
            z = self._next_to_prefetch(pixels)
            if z is None:
                self._wake.clear()
                # A touch between the search and the clear must not be lost: look again.
                if self._next_to_prefetch(self._pixels) is not None:
                    self._wake.set()
                continue
            # One slice at a time, on the model lock: a request waits at most one encode.
            self._embeddings(pixels, [z])

    def close(self) -> None:
        """Stop the background encoder (also done at interpreter exit: it is a daemon)."""
        self._stopped.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=5)
            self._worker = None

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _closed(z_range: tuple[int, int]) -> tuple[int, int]:
    """A closed (z_min, z_max) -> the half-open range() bounds."""
    return z_range[0], z_range[1] + 1

