"""Challenge metrics: Dice similarity coefficient (DSC) and normalised surface Dice (NSD).

Plain NumPy/SciPy (no JAX), so the CPU predictor and the evaluation script can use it
without importing JAX.

The NSD follows the surface-distance algorithm used by the challenge's
`compute_metrics.py`:

1. crop both masks to their joint bounding box and append one zero voxel at the end of
   every axis;
2. give every corner of the voxel grid a neighbour code 0..255, the bit pattern of the
   2x2x2 voxels around it (`scipy.ndimage.correlate` with a kernel of powers of two);
3. codes other than 0 and 255 are surface corners ("surfels"); each code has a surface
   area, the area of the marching-cubes triangles inside that 2x2x2 cell
   (`neighbour_code_normals`, built below from first principles);
4. a Euclidean distance transform (sampling = voxel spacing) of the non-surface corners
   gives, for each surface corner of one mask, its distance to the other mask's surface;
5. NSD = (area of GT surfels within tolerance + area of predicted surfels within
   tolerance) / (total GT area + total predicted area).

Case-level rules (`case_metrics`): labels are the GT's non-zero values; NSD is computed
only when the case DSC exceeds 0.2 (else 0); tolerance 2 everywhere; 2D masks become
(H, W, 1) volumes with spacing [1, 1, 1]; 3D spacing is used as stored in the npz
(the reference applies SimpleITK (x, y, z) spacing to (z, y, x) axes; kept on purpose).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from rep_medsam_jax.io.atomic import atomic_write
from rep_medsam_jax.io.labels import LABEL_MAP_SUFFIXES, read_label_map

NSD_TOLERANCE = 2.0
NSD_MIN_DSC = 0.2

# ---------------------------------------------------------------------------
# Neighbour codes and the code -> surfel-area table
# ---------------------------------------------------------------------------

# The eight voxels of a 2x2x2 cell, as offsets (a0, a1, a2) in {0, 1}^3. Corner `a`
# carries bit 4*a0 + 2*a1 + a2 of the neighbour code.
_CELL_CORNERS: tuple[tuple[int, int, int], ...] = tuple(itertools.product((0, 1), repeat=3))

# correlate(mask, kernel)[p] = sum_a kernel[a] * mask[p - 1 + a] (SciPy centres an even
# kernel at index 1), so kernel[a0, a1, a2] = 2 ** (4*a0 + 2*a1 + a2) gives each voxel of
# the cell around corner point p the bit defined above.
NEIGHBOUR_CODE_KERNEL = (1 << np.arange(8, dtype=np.int32)).reshape(2, 2, 2)


def _corner_bit(corner: tuple[int, int, int]) -> int:
    return 4 * corner[0] + 2 * corner[1] + corner[2]


def _cell_edges() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The 12 edges of the unit cell as (corner, corner) pairs, lower corner first."""
    edges = []
    for corner in _CELL_CORNERS:
        for axis in range(3):
            if corner[axis] == 0:
                other = list(corner)
                other[axis] = 1
                edges.append((corner, tuple(other)))
    return edges


def _cell_faces() -> list[list[tuple[int, ...]]]:
    """The 6 faces of the unit cell, each as its 4 corners in cyclic order."""
    faces = []
    for axis in range(3):
        in_plane = [i for i in range(3) if i != axis]
        for level in (0, 1):
            cycle = []
            for u, v in ((0, 0), (1, 0), (1, 1), (0, 1)):
                corner = [0, 0, 0]
                corner[axis], corner[in_plane[0]], corner[in_plane[1]] = level, u, v
                cycle.append(tuple(corner))
            faces.append(cycle)
    return faces


def _surface_loops(code: int) -> list[np.ndarray]:
    """Marching-cubes surface of one cell as closed loops of edge midpoints.

    Returns a list of (K, 3) arrays, one per loop, vertices in cyclic order (index space,
    cell corners at 0/1). Each cell face whose corners disagree contributes segments
    between midpoints of its sign-changing edges. A face with four sign changes (two
    diagonal inside corners) is ambiguous; we cut off the corners of the minority side
    (inside corners when at most 4 corners are inside, outside corners otherwise), the
    complement-symmetric rule of the classic marching-cubes cases. With 4 inside corners
    both choices give congruent surfaces, hence equal areas.
    """
    inside = {c for c in _CELL_CORNERS if (code >> _corner_bit(c)) & 1}
    separated = inside if len(inside) <= 4 else set(_CELL_CORNERS) - inside

    def edge_key(p, q):
        return (p, q) if p < q else (q, p)

    neighbours: dict = {}
    for face in _cell_faces():
        face_edges = [edge_key(face[i], face[(i + 1) % 4]) for i in range(4)]
        cut = [e for e in face_edges if (e[0] in inside) != (e[1] in inside)]
        if len(cut) == 2:
            segments = [tuple(cut)]
        elif len(cut) == 4:
            # corner i lies between face edges i-1 and i: cut it off on its own.
            segments = [(face_edges[i - 1], face_edges[i])
                        for i, corner in enumerate(face) if corner in separated]
        else:
            segments = []
        for start, end in segments:
            neighbours.setdefault(start, []).append(end)
            neighbours.setdefault(end, []).append(start)

    loops, visited = [], set()
    for first in sorted(neighbours):
        if first in visited:
            continue
        loop, previous, current = [first], None, first
        visited.add(first)
        while True:
            following = next(n for n in neighbours[current] if n != previous)
            if following == first:
                break
            loop.append(following)
            visited.add(following)
            previous, current = current, following
        loops.append(np.array([np.add(p, q) / 2.0 for p, q in loop]))
    return loops


def _polygon_triangulations(n: int) -> list[list[tuple[int, int, int]]]:
    """All triangulations of a convex-indexed polygon 0..n-1 (Catalan(n-2) of them)."""

    @functools.cache
    def triangulate(lo: int, hi: int) -> tuple:
        if hi - lo < 2:
            return ((),)
        result = []
        for apex in range(lo + 1, hi):
            for left in triangulate(lo, apex):
                for right in triangulate(apex, hi):
                    result.append(left + right + ((lo, apex, hi),))
        return tuple(result)

    return [list(t) for t in triangulate(0, n - 1)]


def _triangle_area_vectors(points: np.ndarray, triangles) -> np.ndarray:
    """(T, 3) area vectors: half the cross product; its norm is the triangle's area."""
    tri = np.asarray(triangles)
    a, b, c = points[tri[:, 0]], points[tri[:, 1]], points[tri[:, 2]]
    return 0.5 * np.cross(b - a, c - a)


MAX_TRIANGLES_PER_CODE = 4


@functools.cache
def neighbour_code_normals() -> np.ndarray:
    """(256, 4, 3) float64: area vectors of the surface triangles of each neighbour code.

    Zero rows pad codes with fewer than 4 triangles. Vectors are in index space (unit
    voxels); `surfel_area_table` rescales them to a spacing.

    A non-planar loop (the pentagon of three corners in an L, the hexagon of a 4-corner
    path) has several triangulations with different areas. The classic marching-cubes
    case table triangulates every such loop with its largest-area triangulation (e.g.
    the L pentagon as a fan from a vertex next to the apex, 1.1495 rather than 1.1217 or
    1.1291 voxel areas), so that is the rule used here. Planar loops (triangle, edge
    rectangle, face square, corner hexagon) have one area whatever the triangulation.
    """
    table = np.zeros((256, MAX_TRIANGLES_PER_CODE, 3))
    for code in range(1, 255):
        vectors = []
        for loop in _surface_loops(code):
            candidates = [_triangle_area_vectors(loop, t) for t in _polygon_triangulations(len(loop))]
            areas = [np.linalg.norm(v, axis=1).sum() for v in candidates]
            # first triangulation within rounding of the maximum: deterministic choice.
            best = next(i for i, a in enumerate(areas) if a >= max(areas) - 1e-12)
            vectors.append(candidates[best])
        vectors = np.concatenate(vectors)
        table[code, : len(vectors)] = vectors
    return table


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """(256,) float64 surface area of each neighbour code for a voxel spacing (s0, s1, s2).

    Scaling axis i by s_i maps a triangle's area vector n to
    (n0*s1*s2, n1*s0*s2, n2*s0*s1) (cofactor of the diagonal scaling).
    """
    s0, s1, s2 = (float(s) for s in spacing)
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.linalg.norm(neighbour_code_normals() * scale, axis=-1).sum(axis=-1)


# ---------------------------------------------------------------------------
# Surface distances and the two metrics
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SurfaceDistances:
    """Per-surfel distances to the other surface and per-surfel areas (1-D arrays)."""

    distances_gt_to_pred: np.ndarray
    distances_pred_to_gt: np.ndarray
    surfel_areas_gt: np.ndarray
    surfel_areas_pred: np.ndarray


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """(D, H, W) bool -> (D, H, W) int32 neighbour code of the corner before each voxel.

    Code at index p describes voxels p-1 .. p along every axis (outside = 0).
    """
    return ndimage.correlate(mask.astype(np.int32), NEIGHBOUR_CODE_KERNEL, mode="constant", cval=0)


def compute_surface_distances(mask_gt: np.ndarray, mask_pred: np.ndarray,
                              spacing: Sequence[float]) -> SurfaceDistances:
    """Surface distances between two (D, H, W) boolean masks with voxel `spacing` (3,)."""
    mask_gt = np.asarray(mask_gt, dtype=bool)
    mask_pred = np.asarray(mask_pred, dtype=bool)
    if mask_gt.ndim != 3 or mask_gt.shape != mask_pred.shape:
        raise ValueError(f"need two 3-D masks of one shape, got {mask_gt.shape} and {mask_pred.shape}")
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values, got {spacing!r}")
    empty = np.zeros(0)
    either = mask_gt | mask_pred
    if not either.any():
        return SurfaceDistances(empty, empty, empty, empty)

    # Joint bounding box, then one zero voxel appended at the end of each axis so the
    # corners behind the last voxels get their codes (the front is covered by cval=0).
    bounds = []
    for axis in range(3):
        present = np.flatnonzero(either.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds.append(slice(present[0], present[-1] + 1))
    crop_shape = tuple(s.stop - s.start + 1 for s in bounds)

    areas_by_code = surfel_area_table(spacing)
    borders, areas, distance_maps = [], [], []
    for mask in (mask_gt, mask_pred):
        cropped = np.zeros(crop_shape, dtype=bool)
        cropped[:-1, :-1, :-1] = mask[tuple(bounds)]
        codes = neighbour_codes(cropped)
        border = (codes != 0) & (codes != 255)
        if border.any():
            distance = ndimage.distance_transform_edt(~border, sampling=[float(s) for s in spacing])
        else:
            distance = np.full(crop_shape, np.inf)
        borders.append(border)
        areas.append(areas_by_code[codes[border]])
        distance_maps.append(distance)

    return SurfaceDistances(
        distances_gt_to_pred=distance_maps[1][borders[0]],
        distances_pred_to_gt=distance_maps[0][borders[1]],
        surfel_areas_gt=areas[0],
        surfel_areas_pred=areas[1],
    )


def surface_dice_from_distances(distances: SurfaceDistances, tolerance: float) -> float:
    """Surface Dice at `tolerance` (same unit as spacing); NaN when both surfaces are empty."""
    overlap = (distances.surfel_areas_gt[distances.distances_gt_to_pred <= tolerance].sum()
               + distances.surfel_areas_pred[distances.distances_pred_to_gt <= tolerance].sum())
    total = distances.surfel_areas_gt.sum() + distances.surfel_areas_pred.sum()
    return float(overlap / total) if total > 0 else float("nan")


def surface_dice_at_tolerance(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                              tolerance: float) -> float:
    """NSD of two (D, H, W) boolean masks; 0 if exactly one is empty, NaN if both are."""
    return surface_dice_from_distances(compute_surface_distances(gt, pred, spacing), tolerance)


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """2|G∩S| / (|G| + |S|) of two boolean masks of one shape; NaN if both are empty."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"shape mismatch: gt {gt.shape} vs pred {pred.shape}")
    total = np.count_nonzero(gt) + np.count_nonzero(pred)
    if total == 0:
        return float("nan")
    return 2.0 * np.count_nonzero(gt & pred) / total


def case_metrics(gts: np.ndarray, segs: np.ndarray, spacing: Sequence[float] | None,
                 is_3d: bool, tolerance: float = NSD_TOLERANCE) -> tuple[float, float]:
    """(DSC, NSD) of one case, each the mean over the GT's non-zero labels.

    gts, segs: (H, W) label maps for 2D, (D, H, W) for 3D. spacing: (3,) for 3D, used
    as stored (ignored for 2D, which is scored as (H, W, 1) with spacing [1, 1, 1]).
    NSD is computed only if the case DSC > 0.2, otherwise it is 0. A GT without labels
    gives DSC NaN (mean of nothing, as in the reference) and NSD 0.
    """
    gts = np.asarray(gts)
    segs = np.asarray(segs)
    if gts.shape != segs.shape:
        raise ValueError(f"shape mismatch: gts {gts.shape} vs segs {segs.shape}")
    labels = np.unique(gts[gts > 0])
    if labels.size == 0:
        warnings.warn("ground truth has no labels: DSC is NaN", RuntimeWarning, stacklevel=2)
        return float("nan"), 0.0
    case_dsc = float(np.mean([dice(gts == label, segs == label) for label in labels]))
    if not case_dsc > NSD_MIN_DSC:
        return case_dsc, 0.0
    if is_3d:
        if spacing is None:
            raise ValueError("3D case needs a spacing")
        volume_gts, volume_segs, volume_spacing = gts, segs, spacing
    else:
        volume_gts, volume_segs, volume_spacing = gts[..., None], segs[..., None], (1.0, 1.0, 1.0)
    nsd = [surface_dice_at_tolerance(volume_gts == label, volume_segs == label, volume_spacing,
                                     tolerance) for label in labels]
    return case_dsc, float(np.mean(nsd))


# ---------------------------------------------------------------------------
# Folder evaluation
# ---------------------------------------------------------------------------


def evaluate_folder(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                    out_csv: str | os.PathLike) -> list[dict]:
    """Score every ground truth in `gt_dir` against the same-named prediction in `pred_dir`.

    Ground truths and predictions are read by :func:`rep_medsam_jax.io.labels.read_label_map`:
    challenge `*.npz` (key `gts`; predictions key `segs`; 3D cases are those whose name starts
    with "3D", spacing = the GT's `spacing` used as stored, as the challenge's
    `compute_metrics.py` does), NIfTI `*.nii.gz` / `*.nii` (3D; spacing = the GT header's voxel
    sizes on the stored axes, so no axis quirk; the prediction must lie on the same grid) and
    PNG label maps (2D).

    Returns rows {"case": file name, "dsc", "nsd"} (rounded to 4 decimals, sorted by file
    name) and writes them to `out_csv` atomically (a reader never sees a half-written file).
    A missing prediction scores DSC 0 / NSD 0 with a warning. A prediction whose shape (or, for
    NIfTI, affine) differs from the GT raises ValueError naming the case.
    """
    pred_dir, gt_dir, out_csv = Path(pred_dir), Path(gt_dir), Path(out_csv)
    rows = []
    gt_paths = sorted(p for p in gt_dir.iterdir()
                      if p.is_file() and p.name.lower().endswith(LABEL_MAP_SUFFIXES))
    for gt_path in gt_paths:
        name = gt_path.name
        pred_path = pred_dir / name
        if not pred_path.exists():
            warnings.warn(f"missing prediction for {name}: scored DSC 0, NSD 0", RuntimeWarning,
                          stacklevel=2)
            rows.append({"case": name, "dsc": 0.0, "nsd": 0.0})
            continue
        gt = read_label_map(gt_path, "gts")
        pred = read_label_map(pred_path, "segs")
        if gt.labels.shape != pred.labels.shape:
            raise ValueError(f"{name}: prediction shape {pred.labels.shape} != ground truth "
                             f"shape {gt.labels.shape}")
        if gt.affine is not None and not np.allclose(gt.affine, pred.affine, atol=1e-3):
            raise ValueError(f"{name}: the prediction's affine differs from the ground "
                             "truth's: not the same voxel grid")
        dsc, nsd = case_metrics(gt.labels, pred.labels, gt.spacing, gt.is_3d)
        rows.append({"case": name, "dsc": float(np.round(dsc, 4)), "nsd": float(np.round(nsd, 4))})
    with atomic_write(out_csv) as tmp, open(tmp, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["case", "dsc", "nsd"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
