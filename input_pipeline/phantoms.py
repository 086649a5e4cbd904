"""Built-in data: seeded phantom cases in the challenge format, and a real MR case (MNI152).

Phantoms are for tests, demos and smoke training runs: several objects per image (smooth random
blobs, no two touching) with intensities distinct from their surroundings plus noise, so a model
can learn them, in six looks:

* ``CT``: HU-like values (air, a body with a fat rim, objects brighter or darker than soft
  tissue), noise, windowed to uint8 with level 40 / width 400 (``pre_CT_MR.py``'s defaults).
* ``MR``: grey, a smooth multiplicative bias field, Rician noise, 0.5/99.5 percentile clipping.
* ``US``: speckle (Rayleigh multiplicative noise), log compression, hypo-/hyperechoic objects.
* ``Endoscopy``: RGB pink tissue with texture, vignetting, a circular field of view, shaded
  polyp-like objects and specular highlights.
* ``Dermoscopy``: RGB skin with texture, one or two brown textured lesions, dark corners.
* ``Microscopy``: many small nuclei, either fluorescence (bright on black) or H&E-like (purple
  on pink).

3D cases exist for CT and MR (anisotropic voxels: z spacing 1.5 to 3 times the in-plane one).

Conventions follow the challenge's npz files: 2D ``imgs`` (H, W, 3) uint8, 3D ``imgs``
(D, H, W) uint8; ground truth ``gts`` with labels 1..K in box order; boxes are the tight
bounding boxes of the labels in inclusive pixel indices, [x_min, y_min, x_max, y_max] /
[x_min, y_min, z_min, x_max, y_max, z_max] (optionally enlarged in-plane by a random 0..``box_jitter`` pixels per side, never shrunk,
so a box always contains its object); 3D ``spacing`` is (x, y, z) as in the challenge files.

Everything is a pure function of a ``numpy.random.Generator``; :func:`write_phantom_dataset`
gives case i its own generator seeded by (seed, 2 or 3, i), so a case does not change when the
number of cases does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from rep_medsam_jax.io import atomic_write, percentile_to_uint8, volume_to_dhw, window_ct

MODALITIES_2D = ("CT", "MR", "US", "Endoscopy", "Dermoscopy", "Microscopy")
MODALITIES_3D = ("CT", "MR")

# (min, max) number of objects, and their radius as a fraction of the smaller in-plane side.
_OBJECTS = {
    "CT": ((2, 4), (0.06, 0.14)),
    "MR": ((2, 4), (0.06, 0.14)),
    "US": ((1, 3), (0.08, 0.16)),
    "Endoscopy": ((1, 3), (0.08, 0.16)),
    "Dermoscopy": ((1, 2), (0.10, 0.20)),
    "Microscopy": ((8, 20), (0.025, 0.05)),
}
_MIN_OBJECT_PIXELS = 12
_MIN_RADIUS = 2.5        # pixels: smaller blobs are mostly boundary


class PhantomCase2D(NamedTuple):
    """imgs (H, W, 3) uint8; gts (H, W) uint8 labels 1..K; boxes (K, 4) int64."""

    imgs: np.ndarray
    gts: np.ndarray
    boxes: np.ndarray


class PhantomCase3D(NamedTuple):
    """imgs (D, H, W) uint8; gts (D, H, W) uint8 labels 1..K; boxes (K, 6) int64;
    spacing (3,) float64 in (x, y, z) order."""

    imgs: np.ndarray
    gts: np.ndarray
    boxes: np.ndarray
    spacing: np.ndarray


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------

def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A uniformly random rotation matrix (ndim, ndim)."""
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@dataclasses.dataclass(frozen=True)
class _Blob:
    """A star-shaped blob: an ellipsoid whose radius is modulated by a few smooth waves."""

    center: np.ndarray        # (ndim,) voxel coordinates, axis order of the array
    radii: np.ndarray         # (ndim,) in physical units (in-plane pixels)
    rotation: np.ndarray      # (ndim, ndim)
    wave_directions: np.ndarray   # (3, ndim) unit vectors
    wave_amplitudes: np.ndarray   # (3,)
    wave_frequencies: np.ndarray  # (3,)
    wave_phases: np.ndarray       # (3,)

    MAX_SWELL = 1.4               # 1 + sum of |amplitudes| (<= 0.13 each) stays below this

    def extent(self, voxel_scale: np.ndarray) -> np.ndarray:
        """Half-size of a box that surely contains the blob, in voxels per axis."""
        return self.MAX_SWELL * self.radii.max() / voxel_scale + 1.0

    def rasterize(self, shape: Sequence[int], voxel_scale: np.ndarray
                  ) -> tuple[tuple[slice, ...], np.ndarray]:
        """The blob's crop of an array of ``shape`` and its boolean mask within the crop."""
        extent = self.extent(voxel_scale)
        low = np.maximum(np.floor(self.center - extent).astype(int), 0)
        high = np.minimum(np.ceil(self.center + extent).astype(int) + 1, np.asarray(shape))
        crop = tuple(slice(a, b) for a, b in zip(low, high))
        axes = [np.arange(a, b) - c for a, b, c in zip(low, high, self.center)]
        offsets = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) * voxel_scale
        local = offsets @ self.rotation / self.radii
        rho = np.linalg.norm(local, axis=-1)
        unit = local / np.maximum(rho, 1e-9)[..., None]
        waves = np.sin(self.wave_frequencies * (unit @ self.wave_directions.T) + self.wave_phases)
        return crop, rho <= 1.0 + waves @ self.wave_amplitudes


def _random_blob(rng: np.random.Generator, center: np.ndarray, radii: np.ndarray) -> _Blob:
    ndim = len(center)
    directions = rng.standard_normal((3, ndim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return _Blob(center=center, radii=radii, rotation=_random_rotation(rng, ndim),
                 wave_directions=directions, wave_amplitudes=rng.uniform(-0.13, 0.13, 3),
                 wave_frequencies=rng.uniform(1.0, 3.0, 3),
                 wave_phases=rng.uniform(0, 2 * np.pi, 3))


def _place_objects(rng: np.random.Generator, allowed: np.ndarray, count: int,
                   radius_range: tuple[float, float], voxel_scale: np.ndarray) -> np.ndarray:
    """Up to ``count`` non-touching blobs inside ``allowed``; returns labels 1..K (uint8).

    radius_range is in in-plane pixels; voxel_scale is each axis' voxel size relative to the
    in-plane pixel (so 3D blobs are round in physical space). Blobs that leave ``allowed``,
    touch another blob or are too small are redrawn, a bounded number of times.
    """
    shape = np.asarray(allowed.shape)
    labels = np.zeros(allowed.shape, np.uint8)
    placed = 0
    for _ in range(40 * count):
        if placed == count:
            break
        radii = rng.uniform(*radius_range, size=len(shape))
        # No voxel farther than `half` from the centre can be inside the blob, so a centre in
        # [half, n - 1 - half] keeps it whole. Shrink objects that cannot fit (thin 3D stacks).
        half = _Blob.MAX_SWELL * radii.max() / voxel_scale
        squeeze = np.min((shape - 1) / 2.0 / half)
        if squeeze < 1.0:
            radii, half = radii * squeeze, np.minimum(half * squeeze, (shape - 1) / 2.0)
        center = rng.uniform(half, shape - 1 - half)
        crop, mask = _random_blob(rng, center, radii).rasterize(allowed.shape, voxel_scale)
        if mask.sum() < _MIN_OBJECT_PIXELS or not np.all(allowed[crop][mask]):
            continue
        grown = ndimage.binary_dilation(mask, iterations=2)     # keep a gap between objects
        if np.any(labels[crop][grown]):
            continue
        placed += 1
        labels[crop][mask] = placed
    if placed == 0:
        raise ValueError(f"could not place any object in an image of shape "
                         f"{tuple(int(n) for n in shape)}; use a larger size")
    return labels


def boxes_from_labels(labels: np.ndarray, rng: np.random.Generator | None = None,
                      box_jitter: int = 0) -> np.ndarray:
    """Tight bounding boxes of labels 1..K, in label order (the challenge's box layouts).

    labels: (H, W) -> (K, 4) [x_min, y_min, x_max, y_max]; (D, H, W) -> (K, 6) [x_min, y_min,
    z_min, x_max, y_max, z_max]; inclusive pixel indices, int64. With box_jitter > 0 each in-plane
    side moves outwards by a random 0..box_jitter pixels (clipped to the image).
    """
    count = int(labels.max())
    is_3d = labels.ndim == 3
    boxes = np.zeros((count, 6 if is_3d else 4), np.int64)
    for label in range(1, count + 1):
        coords = np.nonzero(labels == label)
        low = np.array([c.min() for c in coords])[::-1]      # array axes -> (x, y[, z])
        high = np.array([c.max() for c in coords])[::-1]
        if box_jitter > 0:
            if rng is None:
                raise ValueError("box_jitter needs an rng")
            limit = np.array(labels.shape[::-1]) - 1
            low[:2] = np.maximum(low[:2] - rng.integers(0, box_jitter + 1, 2), 0)
            high[:2] = np.minimum(high[:2] + rng.integers(0, box_jitter + 1, 2), limit[:2])
        boxes[label - 1] = np.concatenate([low, high])
    return boxes


# --------------------------------------------------------------------------------------------
# Appearance
# --------------------------------------------------------------------------------------------

def _smooth_field(rng: np.random.Generator, shape: Sequence[int], scale: float) -> np.ndarray:
    """Smooth random field with unit standard deviation and features about ``scale`` pixels."""
    coarse_shape = tuple(max(2, int(round(n / scale)) + 1) for n in shape)
    coarse = rng.standard_normal(coarse_shape)
    field = ndimage.zoom(coarse, [n / c for n, c in zip(shape, coarse_shape)], order=3,
                         mode="nearest")[tuple(slice(0, n) for n in shape)]
    return (field - field.mean()) / max(field.std(), 1e-9)


def _ellipse(shape: Sequence[int], radii_fraction: Sequence[float]) -> np.ndarray:
    """A centred ellipse (2D) or elliptic cylinder along axis 0 (3D), tapering at the ends."""
    height, width = shape[-2:]
    rows, cols = np.ogrid[:height, :width]
    y = (rows - (height - 1) / 2) / (radii_fraction[0] * height)
    x = (cols - (width - 1) / 2) / (radii_fraction[1] * width)
    radius2 = x ** 2 + y ** 2
    if len(shape) == 2:
        return radius2 <= 1.0
    depth = shape[0]
    z = (np.arange(depth) - (depth - 1) / 2) / max(depth / 2, 1)
    taper = (1.0 - 0.15 * z ** 2)[:, None, None]
    return radius2[None] <= taper ** 2


def _object_values(rng: np.random.Generator, count: int, base: float, low: float,
                   high: float) -> np.ndarray:
    """One value per object, each ``low``..``high`` away from ``base``, above or below it."""
    signs = rng.choice([-1.0, 1.0], size=count)
    return base + signs * rng.uniform(low, high, size=count)


def _paint(labels: np.ndarray, background: np.ndarray, values: np.ndarray) -> np.ndarray:
    """background with label k replaced by values[k - 1] (values may be (K,) or (K, C))."""
    table = np.concatenate([np.zeros((1,) + values.shape[1:]), values])
    inside = labels > 0
    out = background.copy()
    out[inside] = table[labels[inside]]
    return out


def _render_ct(rng: np.random.Generator, labels: np.ndarray, body: np.ndarray) -> np.ndarray:
    count = int(labels.max())
    tissue = rng.uniform(20, 50)
    fat_rim = body & ~ndimage.binary_erosion(body, iterations=max(2, labels.shape[-1] // 40))
    hu = np.where(body, tissue, -1000.0)
    hu[fat_rim] = rng.uniform(-120, -80)
    hu = _paint(labels, hu, _object_values(rng, count, tissue, 60, 170))
    hu += 8.0 * _smooth_field(rng, labels.shape, labels.shape[-1] / 16)     # tissue texture
    hu = ndimage.gaussian_filter(hu, 0.6)                                   # partial volume
    hu += rng.normal(0, rng.uniform(8, 18), labels.shape)                   # quantum noise
    return window_ct(hu, 40, 400)


def _render_mr(rng: np.random.Generator, labels: np.ndarray, body: np.ndarray) -> np.ndarray:
    count = int(labels.max())
    tissue = rng.uniform(0.3, 0.5)
    signal = np.where(body, tissue, 0.0)
    signal = _paint(labels, signal, np.clip(_object_values(rng, count, tissue, 0.18, 0.4),
                                            0.05, 1.0))
    signal = signal * (1.0 + 0.05 * _smooth_field(rng, labels.shape, labels.shape[-1] / 12))
    bias = np.exp(0.25 * _smooth_field(rng, labels.shape, labels.shape[-1] / 1.5))
    signal = ndimage.gaussian_filter(signal * bias, 0.6)
    sigma = rng.uniform(0.01, 0.03)
    real = signal + rng.normal(0, sigma, labels.shape)
    imaginary = rng.normal(0, sigma, labels.shape)
    return percentile_to_uint8(np.hypot(real, imaginary))       # Rician magnitude


def _render_us(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    count = int(labels.max())
    tissue = 0.5 * np.exp(0.15 * _smooth_field(rng, labels.shape, labels.shape[-1] / 6))
    # Cysts (anechoic, clipped near 0) or hyperechoic masses, well away from the tissue level.
    echo = _paint(labels, tissue, np.clip(_object_values(rng, count, 0.5, 0.4, 0.8), 0.05, 1.5))
    speckle = ndimage.gaussian_filter(rng.rayleigh(1.0, labels.shape), 0.7)
    envelope = echo * speckle
    image = 20 * np.log10(envelope + 1e-3)                                # log compression
    return percentile_to_uint8(image - image.min() + 1e-3)


def _render_endoscopy(rng: np.random.Generator, labels: np.ndarray,
                      field_of_view: np.ndarray) -> np.ndarray:
    height, width = labels.shape
    count = int(labels.max())
    tissue = np.array([0.78, 0.38, 0.32]) + rng.normal(0, 0.03, 3)
    texture = _smooth_field(rng, labels.shape, width / 10)[..., None]
    rgb = tissue + 0.06 * texture * np.array([1.0, 0.6, 0.5])
    polyps = np.array([0.92, 0.62, 0.50]) + rng.normal(0, 0.04, (count, 3))
    rgb = _paint(labels, rgb, polyps)
    # Polyps bulge: brighter towards their centre (distance inside the object).
    depth = ndimage.distance_transform_edt(labels > 0)
    rgb *= (1.0 + 0.25 * np.tanh(depth / (0.05 * width)))[..., None]
    rows, cols = np.ogrid[:height, :width]
    radius = np.hypot((rows - height / 2) / (height / 2), (cols - width / 2) / (width / 2))
    rgb *= (1.0 - 0.45 * radius ** 2)[..., None]                          # vignetting
    highlights = rng.random(labels.shape) < 0.0015
    rgb[ndimage.binary_dilation(highlights, iterations=1)] = 1.0          # specular spots
    rgb += rng.normal(0, 0.02, rgb.shape)
    rgb[~field_of_view] = 0.0
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _render_dermoscopy(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    height, width = labels.shape
    count = int(labels.max())
    skin = np.array([0.86, 0.66, 0.56]) + rng.normal(0, 0.03, 3)
    rgb = skin + 0.04 * _smooth_field(rng, labels.shape, width / 20)[..., None]
    lesions = np.array([0.45, 0.29, 0.20]) + rng.normal(0, 0.04, (count, 3))
    rgb = _paint(labels, rgb, lesions)
    # Pigment network: a darker fine texture, only inside lesions.
    network = np.clip(_smooth_field(rng, labels.shape, width / 40), 0, None)[..., None]
    rgb -= 0.12 * network * (labels > 0)[..., None]
    rows, cols = np.ogrid[:height, :width]
    radius = np.hypot((rows - height / 2) / (height / 2), (cols - width / 2) / (width / 2))
    rgb *= np.clip(1.25 - 0.5 * radius ** 2, 0, 1)[..., None]             # dark corners
    rgb += rng.normal(0, 0.015, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _render_microscopy(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    count = int(labels.max())
    if rng.random() < 0.5:     # fluorescence: bright nuclei on black, one channel dominant
        colour = np.eye(3)[rng.integers(0, 3)] * 0.8 + 0.15
        background = np.zeros(labels.shape + (3,)) + 0.04
        nuclei = colour * rng.uniform(0.6, 1.0, (count, 1))
    else:                      # H&E-like: purple nuclei on pink stroma
        background = np.array([0.93, 0.74, 0.84]) + 0.05 * _smooth_field(
            rng, labels.shape, labels.shape[-1] / 15)[..., None]
        nuclei = np.array([0.35, 0.22, 0.55]) + rng.normal(0, 0.05, (count, 3))
    rgb = _paint(labels, background, nuclei)
    rgb *= (1.0 + 0.08 * _smooth_field(rng, labels.shape, labels.shape[-1] / 40))[..., None]
    rgb = ndimage.gaussian_filter(rgb, (0.8, 0.8, 0))                     # optics blur
    rgb += rng.normal(0, 0.025, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def make_case_2d(rng: np.random.Generator, modality: str = "CT",
                 size: int | Sequence[int] = 256, box_jitter: int = 0) -> PhantomCase2D:
    """One 2D phantom: imgs (H, W, 3) uint8, gts (H, W) uint8 (labels 1..K), boxes (K, 4).

    size: H = W = size, or (H, W). modality: one of MODALITIES_2D.
    """
    if modality not in MODALITIES_2D:
        raise ValueError(f"unknown 2D modality {modality!r}; choose from {MODALITIES_2D}")
    shape = _as_size(size)
    (low_count, high_count), radius_fraction = _OBJECTS[modality]
    count = int(rng.integers(low_count, high_count + 1))
    radii = tuple(max(f * min(shape), _MIN_RADIUS) for f in radius_fraction)
    one = np.ones(2)

    if modality in ("CT", "MR"):
        body = _ellipse(shape, rng.uniform(0.40, 0.48, 2))
        allowed = ndimage.binary_erosion(body, iterations=max(2, min(shape) // 25))
        labels = _place_objects(rng, allowed, count, radii, one)
        grey = (_render_ct if modality == "CT" else _render_mr)(rng, labels, body)
        image = np.repeat(grey[..., None], 3, axis=-1)
    elif modality == "US":
        labels = _place_objects(rng, np.ones(shape, bool), count, radii, one)
        image = np.repeat(_render_us(rng, labels)[..., None], 3, axis=-1)
    elif modality == "Endoscopy":
        field_of_view = _ellipse(shape, (0.52, 0.52))
        allowed = ndimage.binary_erosion(field_of_view, iterations=3)
        labels = _place_objects(rng, allowed, count, radii, one)
        image = _render_endoscopy(rng, labels, field_of_view)
    elif modality == "Dermoscopy":
        allowed = _ellipse(shape, (0.42, 0.42))
        labels = _place_objects(rng, allowed, count, radii, one)
        image = _render_dermoscopy(rng, labels)
    else:   # Microscopy
        labels = _place_objects(rng, np.ones(shape, bool), count, radii, one)
        image = _render_microscopy(rng, labels)
    return PhantomCase2D(image, labels, boxes_from_labels(labels, rng, box_jitter))


def make_case_3d(rng: np.random.Generator, modality: str = "CT",
                 shape: Sequence[int] = (32, 128, 128), box_jitter: int = 0) -> PhantomCase3D:
    """One 3D phantom: imgs (D, H, W) uint8, gts (D, H, W) uint8 (labels 1..K), boxes (K, 6),
    spacing (3,) (x, y, z) with anisotropic slices. modality: "CT" or "MR"."""
    if modality not in MODALITIES_3D:
        raise ValueError(f"unknown 3D modality {modality!r}; choose from {MODALITIES_3D}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or shape[0] < 3 or min(shape[1:]) < 16:
        raise ValueError(f"shape must be (D, H, W) with D >= 3 and H, W >= 16, got {shape}")
    in_plane = float(rng.choice([0.6, 0.7, 0.8, 0.9, 1.0]))
    slice_thickness = float(in_plane * rng.uniform(1.5, 3.0))
    spacing = np.array([in_plane, in_plane, slice_thickness])
    voxel_scale = np.array([slice_thickness / in_plane, 1.0, 1.0])       # (z, y, x) axes

    (low_count, high_count), radius_fraction = _OBJECTS[modality]
    count = int(rng.integers(low_count, high_count + 1))
    radii = tuple(max(f * min(shape[1:]), _MIN_RADIUS) for f in radius_fraction)
    body = _ellipse(shape, rng.uniform(0.40, 0.48, 2))
    allowed = np.stack([ndimage.binary_erosion(s, iterations=max(2, min(shape[1:]) // 25))
                        for s in body])
    labels = _place_objects(rng, allowed, count, radii, voxel_scale)
    volume = (_render_ct if modality == "CT" else _render_mr)(rng, labels, body)
    return PhantomCase3D(volume, labels, boxes_from_labels(labels, rng, box_jitter), spacing)


# --------------------------------------------------------------------------------------------
# Writing datasets
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PhantomDataset:
    """Where :func:`write_phantom_dataset` put things: challenge inputs and ground truth."""

    inputs_dir: Path
    gts_dir: Path
    names: tuple[str, ...]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def save_challenge_case(inputs_dir: str | os.PathLike, gts_dir: str | os.PathLike, name: str,
                        case: PhantomCase2D | PhantomCase3D) -> None:
    """Write ``<name>.npz`` with imgs / boxes (/ spacing) to inputs_dir and with gts
    (/ spacing) to gts_dir (the challenge's layout)."""
    extra = {"spacing": case.spacing} if isinstance(case, PhantomCase3D) else {}
    _save_npz(Path(inputs_dir) / f"{name}.npz", imgs=case.imgs, boxes=case.boxes, **extra)
    _save_npz(Path(gts_dir) / f"{name}.npz", gts=case.gts, **extra)


def write_phantom_dataset(out_dir: str | os.PathLike, n2d: int = 6, n3d: int = 2, seed: int = 0,
                          size_2d: int | Sequence[int] = 256,
                          shape_3d: Sequence[int] = (32, 128, 128),
                          modalities_2d: Sequence[str] = MODALITIES_2D,
                          modalities_3d: Sequence[str] = MODALITIES_3D,
                          box_jitter: int = 0) -> PhantomDataset:
    """Write n2d 2D and n3d 3D phantom cases under ``out_dir/inputs`` and ``out_dir/gts``.

    Case i of each kind uses modality ``modalities[i % len(modalities)]`` and is named
    ``2DBox_<Modality>_<iiii>`` / ``3DBox_<Modality>_<iiii>``. Deterministic under ``seed``.
    """
    out = Path(out_dir)
    inputs_dir, gts_dir = out / "inputs", out / "gts"
    names = []
    for index in range(n2d):
        modality = modalities_2d[index % len(modalities_2d)]
        rng = np.random.default_rng([seed, 2, index])
        name = f"2DBox_{modality}_{index:04d}"
        save_challenge_case(inputs_dir, gts_dir, name,
                            make_case_2d(rng, modality, size_2d, box_jitter))
        names.append(name)
    for index in range(n3d):
        modality = modalities_3d[index % len(modalities_3d)]
        rng = np.random.default_rng([seed, 3, index])
        name = f"3DBox_{modality}_{index:04d}"
        save_challenge_case(inputs_dir, gts_dir, name,
                            make_case_3d(rng, modality, shape_3d, box_jitter))
        names.append(name)
    return PhantomDataset(inputs_dir, gts_dir, tuple(names))


# --------------------------------------------------------------------------------------------
# Real anatomy: the MNI152 template bundled with nilearn
# --------------------------------------------------------------------------------------------

MNI152_NAME = "3DBox_MR_MNI152"
MNI152_LABELS = ("white matter", "grey matter")


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping factor^3 blocks (trailing voxels that do not fill a block are
    dropped): (X, Y, Z) -> (X // f, Y // f, Z // f)."""
    if factor == 1:
        return volume
    trimmed = volume[tuple(slice(0, (n // factor) * factor) for n in volume.shape)]
    shape = []
    for n in trimmed.shape:
        shape += [n // factor, factor]
    return trimmed.reshape(shape).mean(axis=(1, 3, 5))


def mni152_case(out_dir: str | os.PathLike | None = None, downsample: int = 2,
                threshold: float = 0.5, margin: int = 2) -> PhantomCase3D:
    """A 3D MR case of real anatomy: nilearn's MNI152 (ICBM 2009a) T1 template with labels
    1 = white matter, 2 = grey matter (tissue probability >= threshold, inside the brain mask).

    The template files ship inside the nilearn package: nothing is downloaded. The 1 mm volumes
    are block-averaged by ``downsample`` (probabilities are averaged before thresholding),
    reoriented like a NIfTI input (:func:`rep_medsam_jax.io.volume_to_dhw`: (D, H, W) axial
    slices), cropped to the labelled region plus ``margin`` voxels, and the T1 converted with
    the MR percentile rule. Boxes are the labels' tight 3D boxes; spacing is (x, y, z) in mm.
    With ``out_dir``, also writes ``inputs/3DBox_MR_MNI152.npz`` and ``gts/3DBox_MR_MNI152.npz``.
    downsample 2 gives about (77, 92, 73) voxels; 4 gives (38, 46, 36).
    """
    from nilearn import datasets  # noqa: PLC0415  (data extra; slow import, used only here)

    maps = {name: getattr(datasets, f"load_mni152_{name}")(resolution=None)
            for name in ("template", "gm_template", "wm_template", "brain_mask")}
    affine = maps["template"].affine
    arrays = {name: _block_mean(image.get_fdata(dtype=np.float32), downsample)
              for name, image in maps.items()}
    brain = arrays["brain_mask"] >= 0.5
    white, grey = arrays["wm_template"], arrays["gm_template"]
    labels = np.zeros(brain.shape, np.uint8)
    labels[brain & (white >= threshold) & (white >= grey)] = 1
    labels[brain & (grey >= threshold) & (grey > white)] = 2

    # Block averaging keeps the axis directions, so the 1 mm affine's orientation still holds.
    t1, _ = volume_to_dhw(arrays["template"], affine)
    labels, transform = volume_to_dhw(labels, affine)
    nonzero = np.nonzero(labels)
    crop = tuple(slice(max(int(c.min()) - margin, 0), int(c.max()) + margin + 1)
                 for c in nonzero)
    t1 = np.ascontiguousarray(t1[crop])
    labels = np.ascontiguousarray(labels[crop])

    zooms = np.asarray(maps["template"].header.get_zooms()[:3], np.float64) * downsample
    spacing = np.empty(3)
    for stored_axis in range(3):
        spacing[int(transform[stored_axis, 0])] = zooms[stored_axis]
    case = PhantomCase3D(percentile_to_uint8(t1), labels, boxes_from_labels(labels), spacing)
    if out_dir is not None:
        save_challenge_case(Path(out_dir) / "inputs", Path(out_dir) / "gts", MNI152_NAME, case)
    return case
