"""A seeded synthetic corpus shaped like the CVPR 2024 MedSAM-on-laptop training release.

The release is a tree ``<Modality>/<Dataset>/<case>.npz`` of challenge npz files: ``imgs``
uint8 ((H, W, 3) for 2D images, (D, H, W) for 3D volumes) with the label map ``gts`` (0 =
background, k = object k) in the same file. This module writes such a tree with the size mix of
the release (most slices come from 3D volumes of 50-500 slices at up to 512 x 512; 2D images
from 256 x 256 to 2000 x 2000; several objects per slice), so the input pipeline can be measured
at that scale without the data:

* Every case is a pure function of (seed, case number): a case does not change when the corpus
  grows, and the corpus of N slices is the first cases of the corpus of M > N slices (the
  mix of datasets is kept along the way: each next case goes to the dataset furthest below its
  share of slices).
* Pixels are smooth shapes plus noise, so compression is not trivial: a slowly varying body /
  background, objects (ellipses, ellipsoids in 3D) each with its own grey level or colour, and
  Gaussian noise.
* Every 3D slice inside an object's extent holds a cross-section of at least
  ``_MIN_RADIUS_AT_256`` pixels of radius once resized to 256, so every such slice becomes one
  training record: the number of records is known from the plan, before any pixel is made.

    plan = corpus_plan(seed=0, target_slices=100_000)
    write_corpus(root, plan, processes=2)          # resumable: finished files are kept
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

# An object's radius once the slice is resized to longest side 256 never falls below this, so it
# survives the builder's nearest-neighbour label resize (every planned slice is a record).
_MIN_RADIUS_AT_256 = 2.5
_NOISE_SIGMA = 6.0          # grey levels (CT noise of ~10 HU in a 400 HU window)
_PAD = 64                   # noise planes are this much larger than a slice (random crops)
_ZLIB_LEVEL = 1             # np.savez_compressed uses 6: files ~4% larger, 2x faster to write


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset folder of the release.

    share: its fraction of all training slices. depth: (min, max) slices of a 3D volume (None
    for 2D). side: (min, max) in-plane side in pixels (2D: drawn log-uniformly per axis).
    objects: (min, max) objects per case. radius: (min, max) object radius as a fraction of the
    smaller in-plane side. colour: 2D images in colour (else grey repeated to three channels).
    coverage: fraction of a volume's depth its objects span (3D).
    """

    modality: str
    name: str
    share: float
    side: tuple[int, int]
    objects: tuple[int, int]
    radius: tuple[float, float]
    depth: tuple[int, int] | None = None
    colour: bool = False
    coverage: tuple[float, float] = (0.5, 0.9)

    @property
    def is_3d(self) -> bool:
        return self.depth is not None

    @property
    def folder(self) -> str:
        return f"{self.modality}/{self.name}"


# The release's mix: about 88% of slices from 3D volumes (CT, MR, PET), 2D images of every other
# modality. CT in-plane sides of 512 are the clinical norm; the other sizes follow the public
# sets the release gathers (BraTS 240 x 240, PET ~200, fundus / X-ray up to 2000).
RELEASE_MIX: tuple[DatasetSpec, ...] = (
    DatasetSpec("CT", "AbdomenCT", 0.36, (416, 512), (4, 12), (0.04, 0.12), depth=(80, 300)),
    DatasetSpec("CT", "LungLesionCT", 0.14, (416, 512), (1, 3), (0.02, 0.08), depth=(100, 300),
                coverage=(0.4, 0.7)),
    DatasetSpec("MR", "BrainTumorMR", 0.12, (240, 240), (2, 3), (0.05, 0.15), depth=(60, 155)),
    DatasetSpec("MR", "AbdomenMR", 0.12, (320, 448), (3, 8), (0.05, 0.12), depth=(50, 120)),
    DatasetSpec("PET", "WholeBodyPET", 0.14, (192, 256), (1, 4), (0.03, 0.08), depth=(200, 500),
                coverage=(0.3, 0.7)),
    DatasetSpec("US", "ThyroidUS", 0.02, (400, 800), (1, 2), (0.08, 0.2)),
    DatasetSpec("X-Ray", "ChestXRay", 0.007, (1024, 2000), (2, 4), (0.08, 0.2)),
    DatasetSpec("Endoscopy", "PolypEndoscopy", 0.03, (480, 720), (1, 2), (0.06, 0.18),
                colour=True),
    DatasetSpec("Fundus", "OpticDiscFundus", 0.004, (1000, 2000), (2, 2), (0.05, 0.1),
                colour=True),
    DatasetSpec("Dermoscopy", "SkinLesion", 0.015, (600, 1200), (1, 1), (0.12, 0.3),
                colour=True),
    DatasetSpec("Microscopy", "CellNuclei", 0.025, (256, 1024), (10, 40), (0.02, 0.05),
                colour=True),
    DatasetSpec("OCT", "RetinaOCT", 0.015, (496, 1024), (3, 6), (0.06, 0.15)),
)


@dataclasses.dataclass(frozen=True)
class CasePlan:
    """One case: where it goes and its shape; pixels come from ``seed`` at write time.

    shape: (D, H, W) for 3D, (H, W) for 2D. records: slices that hold an object (the training
    records the builder makes of it).
    """

    number: int
    spec: DatasetSpec
    shape: tuple[int, ...]
    records: int
    seed: tuple[int, int]

    @property
    def case_id(self) -> str:
        kind = "3DBox" if self.spec.is_3d else "2DBox"
        return f"{kind}_{self.spec.modality}_{self.spec.name}_{self.number:06d}"

    @property
    def relative_path(self) -> str:
        return f"{self.spec.folder}/{self.case_id}.npz"

    @property
    def raw_bytes(self) -> int:
        """Bytes of ``imgs`` uncompressed."""
        return math.prod(self.shape) * (1 if self.spec.is_3d else 3)


def _objects_3d(rng: np.random.Generator, spec: DatasetSpec, shape: tuple[int, int, int]
                ) -> list[dict]:
    """Ellipsoids: centre, in-plane radii and angle, z half-extent; all inside the volume."""
    depth, height, width = shape
    cover = rng.uniform(*spec.coverage)
    z_lo = int(depth * (1 - cover) / 2)
    z_hi = max(z_lo + 1, int(depth * (1 + cover) / 2))
    count = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    objects = []
    for k in range(count):
        radius = rng.uniform(*spec.radius) * min(height, width)
        # The first object spans the covered range; the others lie inside it.
        if k == 0:
            z0, z1 = z_lo, z_hi
        else:
            half = int(rng.integers(max(1, (z_hi - z_lo) // 8), max(2, (z_hi - z_lo) // 2)))
            centre = int(rng.integers(z_lo, z_hi))
            z0, z1 = max(z_lo, centre - half), min(z_hi, centre + half + 1)
        objects.append({"z": (z0, z1), "r": (radius * rng.uniform(0.6, 1.0), radius),
                         "centre": (rng.uniform(0.25, 0.75) * height,
                                    rng.uniform(0.25, 0.75) * width),
                         "angle": rng.uniform(0, np.pi), "level": rng.uniform(-70, 90)})
    return objects


def _draw_3d(seed: int, number: int, spec: DatasetSpec
             ) -> tuple[tuple[int, int, int], list[dict]]:
    """The (D, H, W) shape and the objects of a 3D case."""
    rng = np.random.default_rng([seed, number, 0])
    side = int(rng.integers(spec.side[0] // 16, spec.side[1] // 16 + 1)) * 16
    depth = int(rng.integers(spec.depth[0], spec.depth[1] + 1))
    return (depth, side, side), _objects_3d(rng, spec, (depth, side, side))


def plan_case(seed: int, number: int, spec: DatasetSpec) -> CasePlan:
    """The shape and record count of case ``number`` of ``spec`` (no pixels)."""
    rng = np.random.default_rng([seed, number, 0])
    if spec.is_3d:
        (depth, side, _), objects = _draw_3d(seed, number, spec)
        covered = np.zeros(depth, bool)
        for obj in objects:
            covered[obj["z"][0]:obj["z"][1]] = True
        return CasePlan(number, spec, (depth, side, side), int(covered.sum()), (seed, number))
    low, high = np.log(spec.side[0]), np.log(spec.side[1])
    height, width = (int(np.exp(rng.uniform(low, high))) for _ in range(2))
    return CasePlan(number, spec, (height, width), 1, (seed, number))


def corpus_plan(seed: int, target_slices: int,
                mix: Sequence[DatasetSpec] = RELEASE_MIX) -> list[CasePlan]:
    """Cases until their records reach ``target_slices``; each next case goes to the dataset
    furthest below its share, so every prefix of the plan keeps the mix."""
    total_share = sum(s.share for s in mix)
    counts = dict.fromkeys(range(len(mix)), 0)
    plan: list[CasePlan] = []
    done = 0
    while done < target_slices:
        deficit = [mix[i].share / total_share * (done + 1) - counts[i] for i in range(len(mix))]
        chosen = int(np.argmax(deficit))
        case = plan_case(seed, len(plan), mix[chosen])
        plan.append(case)
        counts[chosen] += case.records
        done += case.records
    return plan


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------

def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int = 6
                  ) -> np.ndarray:
    """(H, W) float32 in about [-1, 1], smooth (a cubic upsampling of a few random cells)."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _ellipse_mask(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float],
                  angle: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """The bounding window of a rotated ellipse and its (h, w) bool mask inside it."""
    height, width = shape
    reach = max(radii) + 1
    y0, y1 = max(0, int(centre[0] - reach)), min(height, int(centre[0] + reach) + 1)
    x0, x1 = max(0, int(centre[1] - reach)), min(width, int(centre[1] + reach) + 1)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    dy, dx = yy - centre[0], xx - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (dx * cos + dy * sin) / radii[0], (-dx * sin + dy * cos) / radii[1]
    return (slice(y0, y1), slice(x0, x1)), (u * u + v * v) <= 1.0


def _min_radius(shape: Sequence[int]) -> float:
    """Full-resolution radius that is ``_MIN_RADIUS_AT_256`` pixels after the resize to 256."""
    return _MIN_RADIUS_AT_256 * max(max(shape) / 256, 1.0)


def _noise_bank(rng: np.random.Generator, shape: tuple[int, int], planes: int = 3
                ) -> list[np.ndarray]:
    """Gaussian noise planes ``_PAD`` pixels larger than ``shape``; a slice takes a crop at a
    random offset (drawing fresh noise for every slice would dominate the time to write)."""
    size = (shape[0] + _PAD, shape[1] + _PAD)
    return [rng.standard_normal(size, dtype=np.float32) * _NOISE_SIGMA for _ in range(planes)]


def make_volume(plan: CasePlan) -> tuple[np.ndarray, np.ndarray]:
    """imgs (D, H, W) uint8 and gts (D, H, W) uint8 of a 3D case."""
    depth, height, width = plan.shape
    _, objects = _draw_3d(plan.seed[0], plan.seed[1], plan.spec)
    rng = np.random.default_rng([plan.seed[0], plan.seed[1], 1])
    imgs = np.empty(plan.shape, np.uint8)
    gts = np.zeros(plan.shape, np.uint8)
    # The body: an ellipse of tissue whose texture drifts slowly along z; air outside stays 0,
    # as in a windowed scan.
    body_window, body = _ellipse_mask((height, width), (height / 2, width / 2),
                                      (0.46 * width, 0.40 * height), 0.0)
    inside = np.zeros((height, width), np.float32)
    inside[body_window] = body
    fields = [110.0 + 25.0 * _smooth_field(rng, (height, width)) for _ in range(4)]
    noise = _noise_bank(rng, (height, width))
    offsets = np.column_stack([rng.integers(0, len(noise), depth),
                               rng.integers(0, _PAD, (depth, 2))])
    floor = _min_radius((height, width))
    image = np.empty((height, width), np.float32)
    for z in range(depth):
        t = z / max(depth - 1, 1) * 3
        low = min(int(t), 2)
        np.multiply(fields[low], 1 - (t - low), out=image)
        image += fields[low + 1] * (t - low)
        for label, obj in enumerate(objects, start=1):
            z0, z1 = obj["z"]
            if not z0 <= z < z1:
                continue
            half = (z1 - z0) / 2
            shrink = math.sqrt(max(0.0, 1 - ((z + 0.5 - z0 - half) / half) ** 2))
            radii = tuple(max(r * shrink, floor) for r in obj["r"])
            window, mask = _ellipse_mask((height, width), obj["centre"], radii, obj["angle"])
            image[window][mask] += obj["level"]
            gts[z][window][mask] = label
        plane, dy, dx = offsets[z]
        image += noise[plane][dy:dy + height, dx:dx + width]
        image *= inside
        np.clip(image, 0, 255, out=image)
        imgs[z] = image
    return imgs, gts


def make_image(plan: CasePlan) -> tuple[np.ndarray, np.ndarray]:
    """imgs (H, W, 3) uint8 and gts (H, W) uint8 of a 2D case."""
    height, width = plan.shape
    spec = plan.spec
    rng = np.random.default_rng([plan.seed[0], plan.seed[1], 1])
    base = rng.uniform(60, 160, 3 if spec.colour else 1).astype(np.float32)
    texture = _smooth_field(rng, (height, width), cells=8)[..., None]
    image = base + 35.0 * texture
    gts = np.zeros((height, width), np.uint8)
    count = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    floor = _min_radius((height, width))
    for label in range(1, count + 1):
        radius = max(rng.uniform(*spec.radius) * min(height, width), floor)
        radii = (max(radius * rng.uniform(0.6, 1.0), floor), radius)
        centre = (rng.uniform(radius, height - radius), rng.uniform(radius, width - radius))
        window, mask = _ellipse_mask((height, width), centre, radii, rng.uniform(0, np.pi))
        shift = rng.uniform(-70, 70, 3 if spec.colour else 1).astype(np.float32)
        image[window][mask] += shift
        gts[window][mask] = label
    image = image + rng.standard_normal((height, width, 1), dtype=np.float32) * _NOISE_SIGMA
    image = np.broadcast_to(image, (height, width, 3)) if not spec.colour else image
    return np.clip(image, 0, 255).astype(np.uint8), gts


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez_compressed`` writes (a zip of ``.npy`` members, deflated; ``np.load``
    reads it), at zlib level ``_ZLIB_LEVEL``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=_ZLIB_LEVEL) as archive:
        for key, array in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


def write_case(root: Path, plan: CasePlan) -> int:
    """Write one case (compressed npz, as the release's files are) atomically; its bytes.
    An existing file is kept (a write is all or nothing, so it is complete)."""
    from rep_medsam_jax.io import atomic_write  # noqa: PLC0415

    path = root / plan.relative_path
    if not path.is_file():
        imgs, gts = make_volume(plan) if plan.spec.is_3d else make_image(plan)
        arrays = {"imgs": imgs, "gts": gts}
        if plan.spec.is_3d:
            arrays["spacing"] = np.array([1.0, 1.0, 2.5])
        with atomic_write(path, fsync=False) as tmp:
            _save_npz(tmp, arrays)
    return path.stat().st_size


def _write_one(args: tuple[str, CasePlan]) -> tuple[int, int]:
    root, plan = args
    return plan.number, write_case(Path(root), plan)


def write_corpus(root: str | Path, plan: Sequence[CasePlan], *, processes: int = 1,
                 progress: Callable[[int], None] | None = None) -> dict[int, int]:
    """Write every case of ``plan`` under ``root`` (resumable); {case number: file bytes}.
    progress(n): called with the records of each case as it is done."""
    root = Path(root)
    sizes: dict[int, int] = {}
    jobs = [(str(root), case) for case in plan]
    records = {case.number: case.records for case in plan}
    if processes <= 1:
        results = map(_write_one, jobs)
    else:
        pool = ProcessPoolExecutor(processes)
        results = pool.map(_write_one, jobs, chunksize=1)
    try:
        for number, size in results:
            sizes[number] = size
            if progress is not None:
                progress(records[number])
    finally:
        if processes > 1:
            pool.shutdown(cancel_futures=True)
    return sizes


def link_view(corpus_root: str | Path, view_root: str | Path, plan: Sequence[CasePlan], *,
              flat: bool = False) -> Path:
    """A folder of symbolic links to the files of ``plan`` (a smaller corpus without copying
    data); nested like the release, or ``flat`` (every file directly in the folder)."""
    corpus_root, view_root = Path(corpus_root).resolve(), Path(view_root)
    for case in plan:
        link = view_root / (f"{case.case_id}.npz" if flat else case.relative_path)
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(corpus_root / case.relative_path, link)
    return view_root


def describe(plan: Sequence[CasePlan]) -> dict:
    """Counts of the plan: cases, records, 3D share, largest 2D image, per dataset."""
    per_dataset: dict[str, dict[str, int]] = {}
    for case in plan:
        entry = per_dataset.setdefault(case.spec.folder, {"cases": 0, "records": 0})
        entry["cases"] += 1
        entry["records"] += case.records
    records = sum(c.records for c in plan)
    records_3d = sum(c.records for c in plan if c.spec.is_3d)
    sides_2d = [max(c.shape) for c in plan if not c.spec.is_3d]
    return {"cases": len(plan), "records": records,
            "records_3d_fraction": round(records_3d / max(records, 1), 3),
            "largest_2d_side": max(sides_2d, default=0),
            "raw_bytes": sum(c.raw_bytes for c in plan), "datasets": per_dataset}


def plan_json(plan: Sequence[CasePlan]) -> str:
    """What identifies a written corpus (to refuse mixing two plans in one folder)."""
    return json.dumps([[c.relative_path, list(c.shape), c.records] for c in plan])
