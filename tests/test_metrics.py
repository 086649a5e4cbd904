"""Tests for rep_medsam_jax.metrics (DSC, NSD, folder evaluation).

Independent references: hand-computed geometry (marching-cubes cell areas, a box's exact
surface, the challenge evaluation's 882-surfel square, a shifted square), a code -> area table
built from hand-computed cells alone, and a brute-force NSD written here (explicit corner
enumeration with Python loops and pairwise distances instead of correlate + distance
transforms).
"""

import csv
import itertools
import math

import numpy as np
import pytest

from rep_medsam_jax import metrics

SQRT2, SQRT3 = math.sqrt(2.0), math.sqrt(3.0)


def code_of(corners):
    """Neighbour code of a cell whose inside corners are the given (a0, a1, a2) offsets."""
    return sum(1 << (4 * a0 + 2 * a1 + a2) for a0, a1, a2 in corners)


# ---------------------------------------------------------------------------
# Neighbour codes and the code -> area table
# ---------------------------------------------------------------------------


def test_neighbour_code_bit_layout_single_voxel():
    # Voxel p is corner offset a of the cell at index p + 1 - a; that cell's code is 1 << bit(a).
    volume = np.zeros((3, 3, 3), dtype=bool)
    volume[1, 1, 1] = True
    codes = metrics.neighbour_codes(volume)
    expected = np.zeros((3, 3, 3), dtype=np.int64)
    for a in itertools.product((0, 1), repeat=3):
        expected[tuple(2 - np.array(a))] = code_of([a])
    np.testing.assert_array_equal(codes, expected)


HAND_AREAS = {
    # name: (inside corners, area in unit voxels)
    "one corner: triangle of side sqrt(1/2)": ([(0, 0, 0)], SQRT3 / 8),
    "edge: 1 x sqrt(1/2) rectangle": ([(0, 0, 0), (1, 0, 0)], SQRT2 / 2),
    "face: unit square": ([(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)], 1.0),
    "face diagonal: two separate triangles": ([(0, 0, 0), (1, 1, 0)], SQRT3 / 4),
    "body diagonal: two separate triangles": ([(0, 0, 0), (1, 1, 1)], SQRT3 / 4),
    # pentagon, fan from a vertex next to the apex: triangles 1/2, sqrt(3)/4, sqrt(3)/8
    "L of three on a face": ([(0, 0, 0), (1, 0, 0), (1, 1, 0)], 0.5 + SQRT3 / 4 + SQRT3 / 8),
    # planar regular hexagon of side sqrt(1/2): 3*sqrt(3)/2 * 1/2
    "corner and its three neighbours": ([(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)], 3 * SQRT3 / 4),
    # non-planar hexagon, largest-area triangulation: triangles 3*sqrt(3)/8, sqrt(3)/8, 2 x sqrt(2)/4
    "path of four": ([(0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 1, 1)], SQRT3 / 2 + SQRT2 / 2),
    "two opposite edges: two rectangles": ([(0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, 1)], SQRT2),
    "alternating tetrahedron: four triangles": ([(0, 0, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1)], SQRT3 / 2),
    "edge plus opposite corner": ([(0, 0, 0), (1, 0, 0), (1, 1, 1)], SQRT2 / 2 + SQRT3 / 8),
    "three corners, none adjacent: three triangles": ([(0, 0, 0), (1, 1, 0), (1, 0, 1)],
                                                      3 * SQRT3 / 8),
    "L of three and a lone corner: pentagon and triangle": (
        [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 1)], 0.5 + SQRT3 / 4 + SQRT3 / 4),
}


@pytest.mark.parametrize("name", sorted(HAND_AREAS))
def test_surfel_area_hand_computed(name):
    corners, area = HAND_AREAS[name]
    table = metrics.surfel_area_table((1.0, 1.0, 1.0))
    assert table[code_of(corners)] == pytest.approx(area, abs=1e-12)
    # the complementary cell has the same surface
    assert table[255 - code_of(corners)] == pytest.approx(area, abs=1e-12)


def test_surfel_area_single_corner_anisotropic():
    s0, s1, s2 = 2.5, 0.7, 1.3
    # triangle (s0/2,0,0), (0,s1/2,0), (0,0,s2/2): half the norm of the cross product
    expected = 0.5 * math.sqrt((s1 * s2 / 4) ** 2 + (s0 * s2 / 4) ** 2 + (s0 * s1 / 4) ** 2)
    table = metrics.surfel_area_table((s0, s1, s2))
    for corner in itertools.product((0, 1), repeat=3):
        assert table[code_of([corner])] == pytest.approx(expected, abs=1e-12)


def test_surfel_area_no_surface_codes():
    table = metrics.surfel_area_table((1.0, 2.0, 3.0))
    assert table[0] == 0.0 and table[255] == 0.0
    assert np.all(table[1:255] > 0)


def test_surfel_area_complement_symmetry_all_codes():
    # Swapping inside and outside keeps the surface (for 4-corner cells this also shows
    # that separating the inside or the outside corners of ambiguous faces agrees).
    table = metrics.surfel_area_table((2.5, 0.7, 1.3))
    np.testing.assert_allclose(table, table[::-1], rtol=0, atol=1e-12)


def _cube_symmetries():
    """The 48 symmetries of the cube as (axis permutation, flip per axis)."""
    for permutation in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            yield permutation, flips


def _transform_code(code, permutation, flips):
    inside = [a for a in itertools.product((0, 1), repeat=3) if (code >> (4 * a[0] + 2 * a[1] + a[2])) & 1]
    moved = []
    for a in inside:
        b = [a[permutation[i]] for i in range(3)]
        moved.append(tuple(1 - v if f else v for v, f in zip(b, flips)))
    return code_of(moved)


def hand_area_table() -> np.ndarray:
    """(256,) area of every neighbour code at unit spacing, from HAND_AREAS alone: each code is
    matched to a hand-computed cell by a cube symmetry, possibly after swapping inside and
    outside (marching cubes' cases). Independent of the module's table."""
    table = np.full(256, np.nan)
    table[0] = table[255] = 0.0
    for corners, area in HAND_AREAS.values():
        for permutation, flips in _cube_symmetries():
            moved = _transform_code(code_of(corners), permutation, flips)
            table[moved] = table[255 - moved] = area
    return table


def test_hand_areas_cover_every_code_and_equal_the_module_table():
    table = hand_area_table()
    assert not np.isnan(table).any()                  # the hand cells are all the cases
    np.testing.assert_allclose(metrics.surfel_area_table((1.0, 1.0, 1.0)), table, rtol=0,
                               atol=1e-12)
    np.testing.assert_allclose(metrics.surfel_area_table((1.7, 1.7, 1.7)), 1.7 ** 2 * table,
                               rtol=1e-12)


def test_surfel_area_invariant_under_cube_symmetries():
    spacing = np.array([2.5, 0.7, 1.3])
    table = metrics.surfel_area_table(spacing)
    for permutation, flips in _cube_symmetries():
        # new axis i is old axis permutation[i], so its spacing is spacing[permutation[i]]
        moved_table = metrics.surfel_area_table(spacing[list(permutation)])
        for code in range(256):
            moved = _transform_code(code, permutation, flips)
            assert moved_table[moved] == pytest.approx(table[code], abs=1e-12)


def test_box_surface_area_exact_with_anisotropic_spacing():
    # Marching cubes on a solid box of n0 x n1 x n2 voxels: flat faces between boundary
    # voxel centres, rectangles along the 12 edges, one triangle per corner.
    n = np.array([4, 6, 3])
    s = np.array([2.0, 0.5, 1.5])
    volume = np.zeros(n + 4, dtype=bool)
    volume[2:-2, 2:-2, 2:-2] = True
    faces = 2 * ((n[0] - 1) * s[0] * (n[1] - 1) * s[1] + (n[0] - 1) * s[0] * (n[2] - 1) * s[2]
                 + (n[1] - 1) * s[1] * (n[2] - 1) * s[2])
    edges = 4 * sum((n[axis] - 1) * s[axis] * 0.5 * math.hypot(*[s[i] for i in range(3) if i != axis])
                    for axis in range(3))
    corners = 8 * 0.5 * math.sqrt((s[1] * s[2] / 4) ** 2 + (s[0] * s[2] / 4) ** 2 + (s[0] * s[1] / 4) ** 2)
    distances = metrics.compute_surface_distances(volume, volume, s)
    assert distances.surfel_areas_gt.sum() == pytest.approx(faces + edges + corners, rel=1e-12)
    # surfel count: every corner point touching the box but not strictly inside it
    assert distances.surfel_areas_gt.size == np.prod(n + 1) - np.prod(n - 1)


def test_sphere_area_close_to_analytic():
    # Midpoint marching cubes on a binary ball overestimates the area by a few percent
    # (the staircase is not smoothed); it must stay within 10 % of 4 pi R^2.
    radius = 12
    grid = np.indices((2 * radius + 3,) * 3) - (radius + 1)
    ball = (grid ** 2).sum(0) <= radius ** 2
    area = metrics.compute_surface_distances(ball, ball, (1, 1, 1)).surfel_areas_gt.sum()
    assert 1.0 < area / (4 * math.pi * radius ** 2) < 1.10


def test_square_as_one_slice_volume_has_882_surfels():
    # The challenge's NSD on 2D: a 20x20 square as a (20, 20, 1) volume gives 21*21*2 surface corners.
    square = np.zeros((30, 30, 1), dtype=bool)
    square[5:25, 5:25] = True
    distances = metrics.compute_surface_distances(square, square, (1.0, 1.0, 1.0))
    assert distances.surfel_areas_gt.size == 882
    # per layer: 19*19 face cells, 4*19 edge cells, 4 corner cells
    per_layer = 19 * 19 * 1.0 + 4 * 19 * SQRT2 / 2 + 4 * SQRT3 / 8
    assert distances.surfel_areas_gt.sum() == pytest.approx(2 * per_layer, rel=1e-12)
    assert np.all(distances.distances_gt_to_pred == 0)


# ---------------------------------------------------------------------------
# DSC and NSD: hand-computed cases
# ---------------------------------------------------------------------------


def test_dice_known_overlaps():
    a = np.zeros((10, 10), dtype=bool)
    b = np.zeros((10, 10), dtype=bool)
    a[0:4, 0:5] = True  # 20 pixels
    b[2:6, 0:5] = True  # 20 pixels, 10 shared
    assert metrics.dice(a, b) == pytest.approx(2 * 10 / 40)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, np.zeros_like(a)) == 0.0
    assert math.isnan(metrics.dice(np.zeros_like(a), np.zeros_like(a)))
    with pytest.raises(ValueError):
        metrics.dice(a, b[:5])


def test_nsd_identical_masks_is_one_and_empty_prediction_is_zero():
    rng = np.random.default_rng(1)
    blob = rng.random((8, 9, 7)) > 0.6
    assert metrics.surface_dice_at_tolerance(blob, blob, (1.0, 2.0, 0.5), 0.0) == pytest.approx(1.0)
    assert metrics.surface_dice_at_tolerance(blob, np.zeros_like(blob), (1.0, 1.0, 1.0), 2.0) == 0.0
    assert metrics.surface_dice_at_tolerance(np.zeros_like(blob), blob, (1.0, 1.0, 1.0), 2.0) == 0.0
    assert math.isnan(metrics.surface_dice_at_tolerance(np.zeros_like(blob), np.zeros_like(blob),
                                                        (1.0, 1.0, 1.0), 2.0))


def test_nsd_shifted_square_hand_computed():
    # 2D convention: (H, W, 1) volume, spacing 1. GT corners x in [5, 15], prediction
    # (shifted by 3) x in [8, 18]. Within 2 px: every prediction corner but column 18 and
    # every GT corner but column 5; each excluded column holds 9 edge cells and 2 corner
    # cells per layer, identical for both masks and both layers.
    gt = np.zeros((24, 24), dtype=bool)
    pred = np.zeros((24, 24), dtype=bool)
    gt[5:15, 5:15] = True
    pred[5:15, 8:18] = True
    layer_area = 9 * 9 * 1.0 + 4 * 9 * SQRT2 / 2 + 4 * SQRT3 / 8
    excluded = 9 * SQRT2 / 2 + 2 * SQRT3 / 8
    expected = 1.0 - excluded / layer_area
    nsd = metrics.surface_dice_at_tolerance(gt[..., None], pred[..., None], (1.0, 1.0, 1.0), 2.0)
    assert nsd == pytest.approx(expected, rel=1e-12)
    dsc, case_nsd = metrics.case_metrics(gt.astype(np.uint8), pred.astype(np.uint8), None, is_3d=False)
    assert dsc == pytest.approx(2 * 70 / 200)
    assert case_nsd == pytest.approx(expected, rel=1e-12)


def test_nsd_only_when_case_dsc_above_threshold():
    gt = np.zeros((20, 20), dtype=np.uint8)
    gt[2:12, 2:12] = 1
    pred = np.zeros_like(gt)
    pred[5:7, 5:7] = 1  # DSC = 8 / 104 < 0.2, but the surfaces overlap
    assert metrics.surface_dice_at_tolerance(gt[..., None] == 1, pred[..., None] == 1, (1, 1, 1), 2.0) > 0.1
    dsc, nsd = metrics.case_metrics(gt, pred, None, is_3d=False)
    assert dsc == pytest.approx(8 / 104)
    assert nsd == 0.0


def test_case_metrics_labels_come_from_ground_truth():
    gt = np.zeros((6, 12, 12), dtype=np.uint8)
    gt[1:4, 1:5, 1:5] = 1
    gt[2:5, 6:11, 6:11] = 3  # labels 1 and 3; 2 is absent
    seg = gt.copy()
    seg[0, 0, 0] = 7  # a label only in the prediction is ignored
    seg[gt == 3] = 0  # label 3 missed entirely
    dsc, nsd = metrics.case_metrics(gt, seg, (2.0, 1.0, 1.0), is_3d=True)
    assert dsc == pytest.approx(0.5)
    assert nsd == pytest.approx(0.5)


def test_case_metrics_spacing_used_as_stored():
    gt = np.zeros((8, 8, 8), dtype=np.uint8)
    gt[2:6, 2:6, 2:6] = 1
    seg = np.zeros_like(gt)
    seg[3:7, 2:6, 2:6] = 1  # shifted by one voxel along axis 0
    _, nsd_fine = metrics.case_metrics(gt, seg, (0.5, 1.0, 1.0), is_3d=True)
    _, nsd_coarse = metrics.case_metrics(gt, seg, (5.0, 1.0, 1.0), is_3d=True)
    assert nsd_fine == pytest.approx(1.0)
    assert nsd_coarse < 1.0


# ---------------------------------------------------------------------------
# Brute-force reference
# ---------------------------------------------------------------------------


def brute_force_surfels(mask, spacing, table=None):
    """Surface corner indices (K, 3) and their areas (K,), by loops over every corner.
    table: the code -> area table (256,); default the module's (for checks of the distance
    machinery alone); the hand-computed one ties the whole NSD to the definition."""
    table = metrics.surfel_area_table(spacing) if table is None else table
    shape = mask.shape
    points, areas = [], []
    for corner in itertools.product(*(range(n + 1) for n in shape)):
        code = 0
        for a in itertools.product((0, 1), repeat=3):
            voxel = tuple(c - 1 + o for c, o in zip(corner, a))
            if all(0 <= v < n for v, n in zip(voxel, shape)) and mask[voxel]:
                code |= 1 << (4 * a[0] + 2 * a[1] + a[2])
        if code not in (0, 255):
            points.append(corner)
            areas.append(table[code])
    return np.array(points).reshape(-1, 3), np.array(areas)


def pairwise_distances(points_a, points_b, spacing):
    """(A, B) Euclidean distances; index differences scaled by spacing (no position rounding)."""
    return np.linalg.norm((points_a[:, None, :] - points_b[None, :, :]) * np.asarray(spacing, float), axis=-1)


def brute_force_nsd(gt, pred, spacing, tolerance, table=None):
    gt_points, gt_areas = brute_force_surfels(gt, spacing, table)
    pred_points, pred_areas = brute_force_surfels(pred, spacing, table)
    if len(gt_points) == 0 or len(pred_points) == 0:
        return 0.0
    pairwise = pairwise_distances(gt_points, pred_points, spacing)
    gt_to_pred, pred_to_gt = pairwise.min(axis=1), pairwise.min(axis=0)
    overlap = gt_areas[gt_to_pred <= tolerance].sum() + pred_areas[pred_to_gt <= tolerance].sum()
    return overlap / (gt_areas.sum() + pred_areas.sum())


def _random_blob(rng, shape, fill):
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.random(shape), 0.8)
    return noise > np.quantile(noise, 1 - fill)


@pytest.mark.parametrize("seed", range(4))
def test_nsd_matches_brute_force_3d(seed):
    rng = np.random.default_rng(seed)
    shape = (6, 7, 5)
    gt = _random_blob(rng, shape, 0.35)
    pred = gt ^ (rng.random(shape) < 0.15)
    spacing = (1.7, 0.6, 1.1)
    for tolerance in (0.0, 0.6, 1.0, 1.5, 2.0, 3.0):
        expected = brute_force_nsd(gt, pred, spacing, tolerance)
        assert metrics.surface_dice_at_tolerance(gt, pred, spacing, tolerance) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_nsd_matches_brute_force_with_hand_computed_areas(seed):
    """Isotropic spacing: every area from the hand-computed cells (scaled by s^2), every
    distance from explicit pairs; the challenge's tolerance of 2 and others around it."""
    rng = np.random.default_rng(200 + seed)
    shape = (6, 7, 5)
    gt = _random_blob(rng, shape, 0.35)
    pred = gt ^ (rng.random(shape) < 0.15)
    for s in (1.0, 0.7):
        table = hand_area_table() * s * s
        for tolerance in (0.0, 1.0, 1.5, 2.0, 3.0):
            expected = brute_force_nsd(gt, pred, (s, s, s), tolerance, table)
            got = metrics.surface_dice_at_tolerance(gt, pred, (s, s, s), tolerance)
            assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_nsd_matches_brute_force_2d_slices(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (14, 11)
    gt = _random_blob(rng, shape, 0.3)[..., None]
    pred = _random_blob(rng, shape, 0.3)[..., None]
    for spacing in ((1.0, 1.0, 1.0), (0.8, 1.3, 2.0)):
        for tolerance in (0.5, 1.0, 2.0):
            expected = brute_force_nsd(gt, pred, spacing, tolerance)
            assert metrics.surface_dice_at_tolerance(gt, pred, spacing, tolerance) == pytest.approx(expected, abs=1e-12)


def test_surface_distances_match_brute_force_sets():
    rng = np.random.default_rng(7)
    gt = _random_blob(rng, (5, 6, 6), 0.4)
    pred = _random_blob(rng, (5, 6, 6), 0.4)
    spacing = (2.0, 1.0, 0.5)
    distances = metrics.compute_surface_distances(gt, pred, spacing)
    gt_points, gt_areas = brute_force_surfels(gt, spacing)
    pred_points, _ = brute_force_surfels(pred, spacing)
    expected = pairwise_distances(gt_points, pred_points, spacing).min(axis=1)
    np.testing.assert_allclose(np.sort(distances.distances_gt_to_pred), np.sort(expected), atol=1e-12)
    np.testing.assert_allclose(np.sort(distances.surfel_areas_gt), np.sort(gt_areas), atol=1e-12)


# ---------------------------------------------------------------------------
# Folder evaluation
# ---------------------------------------------------------------------------


def test_evaluate_folder_end_to_end(tmp_path):
    gt_dir, pred_dir = tmp_path / "gts", tmp_path / "segs"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gts_2d = np.zeros((24, 24), dtype=np.uint8)
    gts_2d[5:15, 5:15] = 1
    segs_2d = np.zeros_like(gts_2d)
    segs_2d[5:15, 8:18] = 1
    np.savez_compressed(gt_dir / "2DBox_a.npz", gts=gts_2d)
    np.savez_compressed(pred_dir / "2DBox_a.npz", segs=segs_2d)

    gts_3d = np.zeros((6, 10, 10), dtype=np.uint8)
    gts_3d[1:5, 2:8, 2:8] = 2
    spacing = np.array([1.0, 0.5, 3.0])
    np.savez_compressed(gt_dir / "3DBox_b.npz", gts=gts_3d, spacing=spacing)
    np.savez_compressed(pred_dir / "3DBox_b.npz", segs=gts_3d)

    np.savez_compressed(gt_dir / "3DBox_c.npz", gts=gts_3d, spacing=spacing)  # no prediction
    (gt_dir / "notes.txt").write_text("ignored")

    out_csv = tmp_path / "out" / "metrics.csv"
    with pytest.warns(RuntimeWarning, match="3DBox_c.npz"):
        rows = metrics.evaluate_folder(pred_dir, gt_dir, out_csv)

    expected_2d = metrics.case_metrics(gts_2d, segs_2d, None, is_3d=False)
    assert [r["case"] for r in rows] == ["2DBox_a.npz", "3DBox_b.npz", "3DBox_c.npz"]
    assert rows[0]["dsc"] == np.round(expected_2d[0], 4) == 0.7
    assert rows[0]["nsd"] == np.round(expected_2d[1], 4)
    assert (rows[1]["dsc"], rows[1]["nsd"]) == (1.0, 1.0)
    assert (rows[2]["dsc"], rows[2]["nsd"]) == (0.0, 0.0)

    with open(out_csv, newline="") as stream:
        written = list(csv.DictReader(stream))
    assert [list(r) for r in written] == [["case", "dsc", "nsd"]] * 3
    assert [(r["case"], float(r["dsc"]), float(r["nsd"])) for r in written] == \
        [(r["case"], r["dsc"], r["nsd"]) for r in rows]
    assert sorted(p.name for p in out_csv.parent.iterdir()) == ["metrics.csv"]  # no temp file left


def test_evaluate_folder_shape_mismatch_is_an_error(tmp_path):
    (tmp_path / "gts").mkdir()
    (tmp_path / "segs").mkdir()
    np.savez_compressed(tmp_path / "gts" / "2DBox_x.npz", gts=np.ones((8, 8), np.uint8))
    np.savez_compressed(tmp_path / "segs" / "2DBox_x.npz", segs=np.ones((8, 9), np.uint8))
    with pytest.raises(ValueError, match="2DBox_x.npz"):
        metrics.evaluate_folder(tmp_path / "segs", tmp_path / "gts", tmp_path / "metrics.csv")
    assert not (tmp_path / "metrics.csv").exists()


def _nifti(path, data, zooms, affine=None):
    import nibabel as nib

    affine = np.diag(list(zooms) + [1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(data, affine), path)


def test_evaluate_nifti_uses_the_header_spacing_on_the_stored_axes(tmp_path):
    gt_dir, pred_dir = tmp_path / "gts", tmp_path / "segs"
    gt_dir.mkdir()
    pred_dir.mkdir()
    zooms = (0.5, 1.0, 3.0)
    gt = np.zeros((12, 12, 12), np.uint8)
    gt[3:9, 3:9, 3:9] = 1                                  # a 6-voxel cube
    # Shifted one voxel along axis 0 (0.5 mm): every surface point is within the 2 mm
    # tolerance, so NSD = 1; DSC = 5/6 by overlap.
    along_fine = np.roll(gt, 1, axis=0)
    # Shifted one voxel along axis 2 (3 mm): the moved faces are beyond 2 mm, so NSD < 1.
    along_coarse = np.roll(gt, 1, axis=2)
    for name, pred in (("fine.nii.gz", along_fine), ("coarse.nii.gz", along_coarse)):
        _nifti(gt_dir / name, gt, zooms)
        _nifti(pred_dir / name, pred, zooms)
    rows = {r["case"]: r for r in metrics.evaluate_folder(pred_dir, gt_dir, tmp_path / "m.csv")}
    assert rows["fine.nii.gz"]["dsc"] == rows["coarse.nii.gz"]["dsc"] == round(5 / 6, 4)
    assert rows["fine.nii.gz"]["nsd"] == 1.0
    assert rows["coarse.nii.gz"]["nsd"] < 0.9

    _nifti(pred_dir / "fine.nii.gz", along_fine, zooms, affine=np.diag([0.5, 1.0, 3.0, 1.0])
           + np.array([[0, 0, 0, 10.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="fine.nii.gz: the prediction's affine differs"):
        metrics.evaluate_folder(pred_dir, gt_dir, tmp_path / "m.csv")
    _nifti(pred_dir / "fine.nii.gz", along_fine.astype(np.float32) * 0.5, zooms)
    with pytest.raises(ValueError, match="non-integer"):
        metrics.evaluate_folder(pred_dir, gt_dir, tmp_path / "m.csv")


def test_evaluate_png_label_maps_like_2d_npz(tmp_path):
    import cv2

    gts = np.zeros((24, 24), np.uint8)
    gts[5:15, 5:15] = 3
    segs = np.zeros_like(gts)
    segs[5:15, 8:18] = 3
    for kind in ("png", "npz"):
        (tmp_path / kind / "gts").mkdir(parents=True)
        (tmp_path / kind / "segs").mkdir()
    cv2.imwrite(str(tmp_path / "png" / "gts" / "a.png"), gts)
    cv2.imwrite(str(tmp_path / "png" / "segs" / "a.png"), segs)
    np.savez(tmp_path / "npz" / "gts" / "2D_a.npz", gts=gts)
    np.savez(tmp_path / "npz" / "segs" / "2D_a.npz", segs=segs)
    png = metrics.evaluate_folder(tmp_path / "png" / "segs", tmp_path / "png" / "gts",
                                  tmp_path / "png.csv")
    npz = metrics.evaluate_folder(tmp_path / "npz" / "segs", tmp_path / "npz" / "gts",
                                  tmp_path / "npz.csv")
    assert png[0]["dsc"] == 0.7 and (png[0]["dsc"], png[0]["nsd"]) == (npz[0]["dsc"],
                                                                       npz[0]["nsd"])
