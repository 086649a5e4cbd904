"""Teacher-embedding cache with the tiny ViT: values, byte-sized shards, resumption after a
simulated kill (only missing slices computed, no half-written shard), the reader's bound on open
files, hosts, storage dtypes, versions, the loader's join + flips.

The expected embeddings are the ViT applied directly to ``teacher_input`` of each stored slice
(the cache must store exactly that, rounded to its storage dtype).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
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
                                          load_teacher, make_encode_fn, prefetch, shard_path,
                                          slice_table)
from input_pipeline.teacher_inputs import prepare_batch
from input_pipeline.teacher_storage import quantize_int8
from input_pipeline.tfds_builder import BuildOptions, build_dataset, open_split
from rep_medsam_jax.models.vit import ViTImageEncoder
from rep_medsam_jax.preprocess import teacher_input

REPO = Path(__file__).resolve().parents[1]
BATCH = 2
SLICES_PER_SHARD = 2       # 6 slices: 3 shards
SHARD_MB = SLICES_PER_SHARD * 8 * 8 * 256 * 2 / 2**20      # float16 tiny-ViT embeddings


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
    encode = make_encode_fn(teacher, BATCH)         # device teacher inputs
    return result.dataset_dir, teacher, encode


class Spy:
    """Wraps an encode function and records the slice numbers of every batch it was given."""

    def __init__(self, encode, fail_at_call: int | None = None):
        self.encode, self.fail_at_call = encode, fail_at_call
        self.seen: list[int] = []
        self.calls = 0

    def __call__(self, batch: dict) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise _Killed()
        self.seen += batch["slice"].tolist()
        return self.encode(batch)


_APPLY_CACHE: dict = {}


def _reference_embedding(teacher, record) -> np.ndarray:
    """The ViT on this record's reference teacher input (scikit-image), batch 1, float32 (own
    jit: no padding, no sharding, no storage cast)."""
    if teacher.config.name not in _APPLY_CACHE:
        model = ViTImageEncoder(teacher.config)
        _APPLY_CACHE[teacher.config.name] = jax.jit(lambda v, x: model.apply(v, x)[0])
    region = teacher_source_image(record["image"], record["image_hw"])
    x = teacher_input(region, size=teacher.config.img_size, keep_aspect=True)
    return np.asarray(_APPLY_CACHE[teacher.config.name](teacher.variables, x[None])[0])


def _build(setup, cache_dir, **options):
    dataset_dir, teacher, encode = setup
    options = {"batch_size": BATCH, "shard_mb": SHARD_MB, "encode_fn": encode, "log": _quiet,
               **options}
    return build_teacher_cache(dataset_dir, "train", cache_dir, teacher, **options)


def test_cache_holds_the_teacher_embedding_of_each_records_slice(setup, tmp_path):
    dataset_dir, teacher, encode = setup
    spy = Spy(encode)
    report = _build(setup, tmp_path / "cache", encode_fn=spy)
    table = slice_table(dataset_dir, "train")
    assert sorted(spy.seen) == list(range(table.num_slices))           # one run per slice
    assert table.num_slices == len(table.record_to_slice)               # one record per slice
    assert report.missing_after == 0 and report.examples_per_slice == 1
    assert report.bytes_per_embedding == 8 * 8 * 256 * 2
    # Shards hold SLICES_PER_SHARD slices each (sized in bytes), the last one the rest.
    assert report.total_shards == -(-table.num_slices // SLICES_PER_SHARD)
    sizes = [shard_path(tmp_path / "cache", k).stat().st_size for k in range(report.total_shards)]
    assert sizes[:-1] == [SLICES_PER_SHARD * 8 * 8 * 256 * 2] * (len(sizes) - 1)

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


def _all_embeddings(cache_dir) -> np.ndarray:
    cache = TeacherCache(cache_dir)
    return np.stack([cache.slice_embedding(k) for k in range(cache.manifest["num_slices"])])


def _slices_of(shards, num_slices):
    return sorted(k for k in range(num_slices) if k // SLICES_PER_SHARD in shards)


def test_resume_after_a_kill_computes_only_missing_slices(setup, tmp_path):
    dataset_dir, _, encode = setup
    cache_dir = tmp_path / "cache"
    num_slices = slice_table(dataset_dir, "train").num_slices

    def kill_after_two(shard):
        if shard == 1:
            raise _Killed()

    first = Spy(encode)
    with pytest.raises(_Killed):
        _build(setup, cache_dir, encode_fn=first, on_shard_written=kill_after_two)
    assert sorted(p.name for p in (cache_dir / "shards").iterdir()) == [
        "000000.bin", "000001.bin"]
    # A kill in the middle of a shard (its second batch of one slice) leaves neither shard nor
    # temporary file.
    assert len(_slices_of({2}, num_slices)) >= 2
    mid = Spy(encode, fail_at_call=2)
    with pytest.raises(_Killed):
        _build(setup, cache_dir, encode_fn=mid, batch_size=1)
    assert mid.seen == _slices_of({2}, num_slices)[:1]            # first batch of shard 2
    assert sorted(p.name for p in (cache_dir / "shards").iterdir()) == [
        "000000.bin", "000001.bin"]
    # A SIGKILL while writing leaves a temporary file, which the rerun deletes.
    half = cache_dir / "shards" / ".tmp-0123456789ab-000002.bin"
    half.write_bytes(b"half")

    second = Spy(encode)
    report = _build(setup, cache_dir, encode_fn=second)
    assert report.already_present == 2 and 0 not in report.computed_shards
    missing = set(range(report.total_shards)) - {0, 1}
    assert sorted(second.seen) == _slices_of(missing, num_slices)   # exactly the missing ones
    assert sorted(first.seen + second.seen) == list(range(num_slices))
    assert not half.exists() and report.missing_after == 0

    fresh = tmp_path / "fresh"
    _build(setup, fresh)
    assert np.array_equal(_all_embeddings(cache_dir), _all_embeddings(fresh))
    # Run again: nothing left to compute.
    idle = Spy(encode)
    assert _build(setup, cache_dir, encode_fn=idle).computed_shards == []
    assert idle.seen == []


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_reader_keeps_at_most_max_open_files_open(setup, tmp_path):
    dataset_dir, _, _ = setup
    one_slice_mb = 8 * 8 * 256 * 2 / 2**20
    report = _build(setup, tmp_path / "cache", shard_mb=one_slice_mb)     # a shard per slice
    limit = 2
    assert report.total_shards >= 3 * limit
    cache = TeacherCache(tmp_path / "cache", max_open_files=limit)
    before = _open_descriptors()
    most_open, most_descriptors = 0, 0
    fresh = TeacherCache(tmp_path / "cache", max_open_files=report.total_shards)
    for record in list(range(len(cache))) + list(range(len(cache)))[::-1]:
        assert np.array_equal(cache[record], fresh[record])
        fresh.close()
        most_open = max(most_open, cache.open_files)
        most_descriptors = max(most_descriptors, _open_descriptors() - before)
    assert most_open == limit and most_descriptors == limit
    cache.close()
    assert _open_descriptors() == before


@pytest.mark.parametrize("max_open_files", [1, 64])
def test_threads_sharing_one_reader_get_their_own_slices(setup, tmp_path, max_open_files):
    """grain reads records on several threads of a process with one reader: all threads share
    each file's position, and with one open file allowed every read evicts another thread's."""
    one_slice_mb = 8 * 8 * 256 * 2 / 2**20
    _build(setup, tmp_path / "cache", shard_mb=one_slice_mb)              # a shard per slice
    expected = _all_embeddings(tmp_path / "cache")
    shared = TeacherCache(tmp_path / "cache", max_open_files=max_open_files)
    records = len(shared)
    errors: list[BaseException] = []
    wrong: list[tuple[int, int]] = []
    start = threading.Barrier(6)

    def read(thread: int) -> None:
        order = np.random.default_rng(thread).permutation(np.tile(np.arange(records), 60))
        start.wait()
        try:
            for record in order:
                got = shared[int(record)]
                if not np.array_equal(got, expected[shared.record_to_slice[record]]):
                    wrong.append((thread, int(record)))
        except BaseException as err:  # noqa: BLE001  (reported by the test)
            errors.append(err)

    threads = [threading.Thread(target=read, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert not wrong, wrong[:5]
    assert shared.open_files == min(max_open_files, len(expected))
    # It still pickles (to grain's worker processes) and reads there.
    import pickle  # noqa: PLC0415

    copy = pickle.loads(pickle.dumps(shared))
    assert np.array_equal(copy[0], expected[shared.record_to_slice[0]])


def test_an_old_or_foreign_cache_is_refused(setup, tmp_path):
    _build(setup, tmp_path / "cache")
    manifest_path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match="version 1, this code reads version 2"):
        TeacherCache(tmp_path / "cache")
    with pytest.raises(TeacherCacheError, match="version 1"):
        _build(setup, tmp_path / "cache")
    manifest_path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(TeacherCacheError, match="not a teacher cache"):
        TeacherCache(tmp_path / "cache")


def test_hosts_split_the_shards_and_the_cache_is_complete_when_all_finished(setup, tmp_path):
    dataset_dir, teacher, encode = setup
    cache_dir = tmp_path / "cache"
    reports = []
    for host in (1, 0):
        reports.append(_build(setup, cache_dir, process_index=host, process_count=2))
        if host == 1:
            with pytest.raises(TeacherCacheError, match="missing"):
                TeacherCache(cache_dir).check_matches(
                    dataset_dir, "train", len(slice_table(dataset_dir, "train").record_to_slice))
    assert all(k % 2 == 1 for k in reports[0].computed_shards)
    assert all(k % 2 == 0 for k in reports[1].computed_shards)
    assert reports[1].missing_after == 0
    assert len(reports[0].computed_shards) + len(reports[1].computed_shards) == \
        reports[1].total_shards


@pytest.mark.parametrize("storage_dtype", ["bfloat16", "int8"])
def test_other_storage_dtypes_store_what_the_codec_gives(setup, tmp_path, storage_dtype):
    dataset_dir, teacher, encode = setup
    _build(setup, tmp_path / "cache", storage_dtype=storage_dtype)
    cache = TeacherCache(tmp_path / "cache")
    records = open_split(dataset_dir, "train")
    stored = cache[3]
    slice_number = int(cache.record_to_slice[3])
    record = records[int(slice_table(dataset_dir, "train").first_record[slice_number])]
    batch = prepare_batch([record["image"]], [record["image_hw"]], "device",
                          teacher.config.img_size)
    exact = encode(batch)
    if storage_dtype == "bfloat16":
        assert stored.dtype == ml_dtypes.bfloat16
        assert np.array_equal(stored.view(np.uint16),
                              exact[0].astype(ml_dtypes.bfloat16).view(np.uint16))
    else:
        codes, scales = quantize_int8(exact)
        assert stored.dtype == np.float32
        assert np.array_equal(stored, codes[0].astype(np.float32) * scales[0])
    expected = _reference_embedding(teacher, records[3])
    assert np.allclose(stored.astype(np.float32), expected, rtol=1e-2, atol=2e-2)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["storage_dtype"] == storage_dtype


def test_a_cache_of_another_teacher_or_layout_is_refused(setup, tmp_path):
    _, teacher, _ = setup
    _build(setup, tmp_path / "cache")
    other = teacher.__class__(teacher.config, teacher.variables, "random:vit_tiny:seed1")
    with pytest.raises(TeacherCacheError, match="differs in teacher"):
        build_teacher_cache(setup[0], "train", tmp_path / "cache", other, batch_size=BATCH,
                            shard_mb=SHARD_MB, encode_fn=setup[2], log=_quiet)
    with pytest.raises(TeacherCacheError, match="slices_per_shard"):
        _build(setup, tmp_path / "cache", shard_mb=2 * SHARD_MB)
    with pytest.raises(TeacherCacheError, match="teacher_input"):
        _build(setup, tmp_path / "cache", teacher_input_mode="grey")


def test_loader_joins_embeddings_and_flips_them_with_the_image(setup, tmp_path):
    dataset_dir, teacher, encode = setup
    _build(setup, tmp_path / "cache")
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
    _build(setup, tmp_path / "cache")
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
               "--variant", "vit_tiny", "--batch-size", "8", "--dtype", "int8",
               "--shard-mb", "0.1", "--teacher-input", "grey"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "complete" in run.stderr and "per million examples" in run.stderr
    assert TeacherCache(tmp_path / "cache").missing_shards() == []


def test_prefetch_runs_ahead_keeps_order_and_raises_the_producers_error():
    ahead = threading.Event()

    def produce():
        for item in range(6):
            if item == 2:
                ahead.set()         # reached while the consumer still holds item 0
            yield item

    items = prefetch(produce(), depth=2)
    assert next(items) == 0
    assert ahead.wait(timeout=60)
    assert list(items) == [1, 2, 3, 4, 5]

    def failing():
        yield 1
        raise ValueError("slice 7 unreadable")

    with pytest.raises(ValueError, match="slice 7 unreadable"):
        list(prefetch(failing()))
