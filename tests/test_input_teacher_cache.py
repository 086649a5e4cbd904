"""Teacher-embedding cache with the tiny ViT: values, resumption after a simulated kill (no
slice computed twice, no half-written shard), hosts, storage dtypes, the loader's join + flips.

The expected embeddings are the ViT applied directly to ``teacher_input`` of each stored slice
(the cache must store exactly that, rounded to its storage dtype).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from input_pipeline.augment import AugmentConfig
from input_pipeline.examples import student_image, teacher_source_image
from input_pipeline.loader import make_loader
from input_pipeline.phantoms import write_phantom_dataset
from input_pipeline.teacher_cache import (TeacherCache, TeacherCacheError, build_teacher_cache,
                                          load_teacher, make_encode_fn, shard_path, slice_table)
from input_pipeline.tfds_builder import BuildOptions, build_dataset, open_split
from rep_medsam_jax.models.vit import ViTImageEncoder
from rep_medsam_jax.preprocess import teacher_input

REPO = Path(__file__).resolve().parents[1]
BATCH = 2


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    # Microscopy: many objects per slice, so several records share one embedding.
    write_phantom_dataset(root / "cases", n2d=3, n3d=1, seed=2, size_2d=(40, 56),
                          shape_3d=(5, 32, 32),
                          modalities_2d=("Microscopy", "Endoscopy", "CT"))
    result = build_dataset(root / "cases", root / "data",
                           BuildOptions(validation_fraction=0.0), log=_quiet)
    teacher = load_teacher(variant="vit_tiny", random_seed=0)
    encode = make_encode_fn(teacher, BATCH, "float16")
    return result.dataset_dir, teacher, encode


class Spy:
    """Wraps an encode function and records a hash of every teacher input it was given."""

    def __init__(self, encode):
        self.encode = encode
        self.seen: list[str] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.seen += [hashlib.sha1(image.tobytes()).hexdigest() for image in images]
        return self.encode(images)


_APPLY_CACHE: dict = {}


def _reference_embedding(teacher, record) -> np.ndarray:
    """The ViT on this record's teacher input, batch 1, float32 (own jit: no padding, no
    sharding, no storage cast)."""
    if teacher.config.name not in _APPLY_CACHE:
        model = ViTImageEncoder(teacher.config)
        _APPLY_CACHE[teacher.config.name] = jax.jit(lambda v, x: model.apply(v, x)[0])
    region = teacher_source_image(record["image"], record["image_hw"])
    x = teacher_input(region, size=teacher.config.img_size, keep_aspect=True)
    return np.asarray(_APPLY_CACHE[teacher.config.name](teacher.variables, x[None])[0])


def test_cache_holds_the_teacher_embedding_of_each_records_slice(setup, tmp_path):
    dataset_dir, teacher, encode = setup
    spy = Spy(encode)
    report = build_teacher_cache(dataset_dir, "train", tmp_path / "cache", teacher,
                                 batch_size=BATCH, encode_fn=spy, log=_quiet)
    table = slice_table(dataset_dir, "train")
    assert len(spy.seen) == table.num_slices == len(table.record_to_slice)  # one per slice
    assert report.missing_after == 0 and report.examples_per_slice == 1
    assert report.bytes_per_embedding == 8 * 8 * 256 * 2

    cache = TeacherCache(tmp_path / "cache")
    cache.check_matches(dataset_dir, "train", len(table.record_to_slice))
    records = open_split(dataset_dir, "train")
    for index in range(0, len(records), 5):
        expected = _reference_embedding(teacher, records[index])
        stored = cache[index]
        assert stored.dtype == np.float16 and stored.shape == (8, 8, 256)
        assert np.allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    # One record per slice: the record -> slice table is the identity.
    assert np.array_equal(table.record_to_slice, np.arange(len(records)))


class _Killed(KeyboardInterrupt):
    pass


def test_resume_after_a_kill_computes_no_slice_twice(setup, tmp_path):
    dataset_dir, teacher, encode = setup
    cache_dir = tmp_path / "cache"
    first = Spy(encode)

    def kill_after_two(shard):
        if shard == 1:
            raise _Killed()

    with pytest.raises(_Killed):
        build_teacher_cache(dataset_dir, "train", cache_dir, teacher, batch_size=BATCH,
                            encode_fn=first, on_shard_written=kill_after_two, log=_quiet)
    assert sorted(p.name for p in (cache_dir / "shards").glob("*.npy")) == [
        "000000.npy", "000001.npy"]
    # A kill in the middle of writing leaves only a temporary file, never a shard.
    half = cache_dir / "shards" / ".tmp-0123456789ab-000002.npy"
    half.write_bytes(b"\x93NUMPY half")

    second = Spy(encode)
    report = build_teacher_cache(dataset_dir, "train", cache_dir, teacher, batch_size=BATCH,
                                 encode_fn=second, log=_quiet)
    assert report.already_present == 2 and 0 not in report.computed_shards
    assert not set(first.seen) & set(second.seen)
    table = slice_table(dataset_dir, "train")
    assert len(first.seen) + len(second.seen) == table.num_slices
    assert not half.exists() and report.missing_after == 0

    fresh = tmp_path / "fresh"
    build_teacher_cache(dataset_dir, "train", fresh, teacher, batch_size=BATCH, encode_fn=encode,
                        log=_quiet)
    for shard in range(report.total_shards):
        assert np.array_equal(np.load(shard_path(cache_dir, shard)),
                              np.load(shard_path(fresh, shard)))
    # Run again: nothing left to compute.
    idle = Spy(encode)
    assert build_teacher_cache(dataset_dir, "train", cache_dir, teacher, batch_size=BATCH,
                               encode_fn=idle, log=_quiet).computed_shards == []
    assert idle.seen == []


def test_hosts_split_the_shards_and_the_cache_is_complete_when_all_finished(setup, tmp_path):
    dataset_dir, teacher, encode = setup
    cache_dir = tmp_path / "cache"
    reports = []
    for host in (1, 0):
        reports.append(build_teacher_cache(dataset_dir, "train", cache_dir, teacher,
                                           batch_size=BATCH, process_index=host,
                                           process_count=2, encode_fn=encode, log=_quiet))
        if host == 1:
            with pytest.raises(TeacherCacheError, match="missing"):
                TeacherCache(cache_dir).check_matches(
                    dataset_dir, "train", len(slice_table(dataset_dir, "train").record_to_slice))
    assert all(k % 2 == 1 for k in reports[0].computed_shards)
    assert all(k % 2 == 0 for k in reports[1].computed_shards)
    assert reports[1].missing_after == 0
    assert len(reports[0].computed_shards) + len(reports[1].computed_shards) == \
        reports[1].total_shards


def test_bfloat16_storage_keeps_the_exact_bits(setup, tmp_path):
    dataset_dir, teacher, _ = setup
    encode32 = make_encode_fn(teacher, BATCH, "float32")
    encode16 = lambda x: encode32(x).astype(ml_dtypes.bfloat16)  # noqa: E731
    build_teacher_cache(dataset_dir, "train", tmp_path / "cache", teacher, batch_size=BATCH,
                        storage_dtype="bfloat16", encode_fn=encode16, log=_quiet)
    cache = TeacherCache(tmp_path / "cache")
    records = open_split(dataset_dir, "train")
    stored = cache[3]
    assert stored.dtype == ml_dtypes.bfloat16
    region = teacher_source_image(records[3]["image"], records[3]["image_hw"])
    inputs = teacher_input(region, size=teacher.config.img_size, keep_aspect=True)[None]
    assert np.array_equal(stored.view(np.uint16), encode16(inputs)[0].view(np.uint16))
    expected = _reference_embedding(teacher, records[3])
    assert np.allclose(stored.astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["storage_dtype"] == "bfloat16"


def test_a_cache_of_another_teacher_is_refused(setup, tmp_path):
    dataset_dir, teacher, encode = setup
    build_teacher_cache(dataset_dir, "train", tmp_path / "cache", teacher, batch_size=BATCH,
                        encode_fn=encode, log=_quiet)
    other = teacher.__class__(teacher.config, teacher.variables, "random:vit_tiny:seed1")
    with pytest.raises(TeacherCacheError, match="differs in teacher"):
        build_teacher_cache(dataset_dir, "train", tmp_path / "cache", other, batch_size=BATCH,
                            encode_fn=encode, log=_quiet)
    with pytest.raises(TeacherCacheError, match="shard_size"):
        build_teacher_cache(dataset_dir, "train", tmp_path / "cache", teacher, batch_size=3,
                            encode_fn=encode, log=_quiet)


def test_loader_joins_embeddings_and_flips_them_with_the_image(setup, tmp_path):
    dataset_dir, teacher, encode = setup
    build_teacher_cache(dataset_dir, "train", tmp_path / "cache", teacher, batch_size=BATCH,
                        encode_fn=encode, log=_quiet)
    cache = TeacherCache(tmp_path / "cache")
    records = open_split(dataset_dir, "train")
    always_flip = AugmentConfig(flip_probability=1.0, color_jitter=False, box_shift=0)
    loader = make_loader(dataset_dir, "train", batch_size=3, seed=0, augment=always_flip,
                         teacher_cache_dir=tmp_path / "cache")
    batch = next(iter(loader))
    assert batch["teacher_embedding"].shape == (3, 8, 8, 256)
    for row, index in enumerate(batch["index"]):
        record = records[int(index)]
        assert np.array_equal(batch["teacher_embedding"][row], cache[int(index)][::-1, ::-1])
        assert np.array_equal(batch["image"][row],
                              student_image(record["image"], record["image_hw"])[::-1, ::-1])
        expected_mask = record["labels"] == batch["label"][row]
        assert np.array_equal(batch["mask"][row], expected_mask[::-1, ::-1])


def test_teacher_and_student_inputs_cover_the_same_region():
    """A 128 x 256 (H x W) slice region: the student's valid rows are 0..127 of 256, the
    teacher's 0..511 of 1024; both grids therefore see the slice in the same top half."""
    rng = np.random.default_rng(0)
    stored = np.zeros((256, 256, 3), np.uint8)
    stored[:128] = rng.integers(1, 256, (128, 256, 3))
    hw = np.array([128, 256])
    student = student_image(stored, hw)
    teacher = teacher_input(teacher_source_image(stored, hw), size=1024, keep_aspect=True)
    assert teacher.shape == (1024, 1024, 3)
    assert not teacher[512:].any() and teacher[:512].any()
    assert not student[128:].any() and student[:128].any()
    # 4x block means of the teacher input follow the student input (same picture, 4x finer).
    pooled = teacher.reshape(256, 4, 256, 4, 3).mean(axis=(1, 3))
    assert np.corrcoef(pooled[:128].ravel(), student[:128].ravel())[0, 1] > 0.9


def test_missing_or_foreign_caches_are_reported(setup, tmp_path):
    dataset_dir, teacher, encode = setup
    with pytest.raises(TeacherCacheError, match="no manifest.json"):
        TeacherCache(tmp_path)
    build_teacher_cache(dataset_dir, "train", tmp_path / "cache", teacher, batch_size=BATCH,
                        encode_fn=encode, log=_quiet)
    cache = TeacherCache(tmp_path / "cache")
    with pytest.raises(TeacherCacheError, match="not 'validation'"):
        cache.check_matches(dataset_dir, "validation", len(cache))
    with pytest.raises(TeacherCacheError, match="covers"):
        cache.check_matches(dataset_dir, "train", len(cache) + 1)
    shard_path(tmp_path / "cache", 1).unlink()
    with pytest.raises(TeacherCacheError, match="1 of .* missing"):
        make_loader(dataset_dir, "train", batch_size=1, teacher_cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_teacher_cache_command(setup, tmp_path):
    dataset_dir, _, _ = setup
    command = [sys.executable, "-m", "input_pipeline.teacher_cache", "--dataset-dir",
               str(dataset_dir), "--out", str(tmp_path / "cache"), "--random-init", "0",
               "--variant", "vit_tiny", "--batch-size", "8", "--dtype", "bfloat16"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "complete" in run.stderr and "per million examples" in run.stderr
    assert TeacherCache(tmp_path / "cache").missing_shards() == []
