"""Teacher-embedding cache for distillation: MedSAM ViT-B over a built dataset, stored once.

    python -m input_pipeline.teacher_cache --dataset-dir DATA/med_sam_slices/size256/2.0.0 \\
        --split train --out CACHE --checkpoint medsam_vit_b.pth [--dtype float16] \\
        [--batch-size 16] [--shard-mb 256] [--teacher-input device]

What is computed. The teacher runs once per *slice* (the records of one slice are found from
the dataset's ``records-<split>.npz`` without reading images; with one record per slice the
table is the identity). The teacher's input is the valid (newh, neww) region of the stored
uint8 slice through ``teacher_input(..., size=1024, keep_aspect=True)`` (scikit-image order 3,
longest side to 1024, min-max to [0, 1], zero-padded bottom/right), computed by one of the
paths of ``input_pipeline.teacher_inputs`` (``--teacher-input``; default ``device``: the
resize as two matmuls inside the teacher's jitted function). The student's 256 input is the
same region min-max normalised and padded, so both 64 x 64 grids cover the same pixels.

Storage. ``CACHE/shards/<k>.bin`` holds the slices [k * S, (k + 1) * S) back to back, each
``slice_nbytes`` bytes (``input_pipeline.teacher_storage``: float16, bfloat16 or int8 with
per-channel scales), S = slices per shard from ``--shard-mb`` (default 256 MB); slice i of a
shard is read by seek + readinto. ``CACHE/record_to_slice.npy`` maps each record to its slice;
``CACHE/manifest.json`` says what was cached with what (format version ``CACHE_VERSION``).

Resuming. A shard is written to a temporary file batch by batch and renamed when its last
slice is in, so it exists complete or not at all; a rerun deletes this host's temporaries and
computes only the slices of missing shards. A kill loses at most the shard in flight. Hosts
split the shards round-robin (shard k belongs to host k mod n).

Reading. ``TeacherCache`` keeps at most ``max_open_files`` shard files open per process (least
recently used closed first), whatever the number of shards.

Devices and host. The batch is split over the local devices (1-D mesh), padded to a fixed size
so the function compiles once. A background thread (or ``--workers`` grain processes) prepares
the next batches' host part while the device runs the current one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from input_pipeline.teacher_inputs import (TEACHER_INPUT_MODES, device_teacher_inputs,
                                           prepare_batch)
from input_pipeline.teacher_storage import STORAGE_DTYPES, encode_slices, slice_nbytes
from input_pipeline.tfds_builder import open_split, read_record_index, records_path
from rep_medsam_jax.io import atomic_write, write_text_atomic
from rep_medsam_jax.io.storage import as_path, is_url, load_npy, upload
from rep_medsam_jax.models.config import VIT_VARIANTS, ViTConfig

CACHE_FORMAT = "rep_medsam_jax.teacher_cache"
CACHE_VERSION = 2        # 1: one .npy per jitted batch
DEFAULT_SHARD_MB = 256
DEFAULT_MAX_OPEN_FILES = 8
_LOG = logging.getLogger(__name__)


class TeacherCacheError(ValueError):
    """The cache does not belong to this dataset / teacher, or is incomplete."""


# --------------------------------------------------------------------------------------------
# Which slice each record shows
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SliceTable:
    """record_to_slice: (N_records,) int64; first_record: (N_slices,) int64, one record per
    slice (the first in storage order), slices numbered by first appearance."""

    record_to_slice: np.ndarray
    first_record: np.ndarray

    @property
    def num_slices(self) -> int:
        return int(self.first_record.shape[0])

    def fingerprint(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.record_to_slice, np.int64).tobytes())
        return digest.hexdigest()


def _table_from_keys(keys: list[tuple[Any, int]]) -> SliceTable:
    numbering: dict[tuple[Any, int], int] = {}
    first, record_to_slice = [], np.empty(len(keys), np.int64)
    for record, key in enumerate(keys):
        if key not in numbering:
            numbering[key] = len(first)
            first.append(record)
        record_to_slice[record] = numbering[key]
    return SliceTable(record_to_slice, np.asarray(first, np.int64))


def slice_table(dataset_dir: str | Path, split: str) -> SliceTable:
    """The slice of every record: from ``records-<split>.npz`` (no image read), else by reading
    each record's case id and slice index."""
    if records_path(dataset_dir, split).is_file():
        index = read_record_index(dataset_dir, split)
        keys = list(zip(index["case"].tolist(), index["slice_index"].tolist()))
    else:
        source = open_split(dataset_dir, split)
        keys = [(source[i]["case_id"], int(source[i]["slice_index"])) for i in range(len(source))]
    return _table_from_keys(keys)


# --------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Teacher:
    """A ViT image encoder and its variables ``{"params": ...}``; ``weights`` says where they
    came from (recorded in the manifest, so a cache is never mixed across teachers)."""

    config: ViTConfig
    variables: dict
    weights: str
    compute_dtype: str = "float32"

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        grid = self.config.grid_size
        return (grid, grid, self.config.out_chans)


def load_teacher(*, model_dir: str | Path | None = None, checkpoint: str | Path | None = None,
                 variant: str = "medsam_vit_b", random_seed: int | None = None,
                 compute_dtype: str = "float32") -> Teacher:
    """From a converted model directory, a MedSAM ``.pth`` (converted on the fly) or, for tests
    and smoke runs, random weights of ``variant``."""
    if model_dir is not None:
        from rep_medsam_jax.model_dir import load_model_dir  # noqa: PLC0415

        config, variables = load_model_dir(model_dir)
        if config.encoder != "vit":
            raise TeacherCacheError(f"{model_dir} holds a {config.encoder} encoder; the teacher "
                                    "is a ViT (convert medsam_vit_b.pth with --from medsam)")
        return Teacher(VIT_VARIANTS[config.encoder_variant],
                       {"params": variables["params"]["image_encoder"]},
                       f"model_dir:{model_dir if is_url(model_dir) else Path(model_dir).resolve()}",
                       compute_dtype)
    if checkpoint is not None:
        from rep_medsam_jax.convert.checkpoints import convert_state_dict  # noqa: PLC0415
        from rep_medsam_jax.convert.torch_io import load_torch_state_dict  # noqa: PLC0415

        config, variables, _ = convert_state_dict(load_torch_state_dict(checkpoint), "medsam")
        return Teacher(VIT_VARIANTS[config.encoder_variant],
                       {"params": variables["params"]["image_encoder"]},
                       f"checkpoint:{Path(checkpoint).resolve()}", compute_dtype)
    if random_seed is None:
        raise ValueError("give model_dir, checkpoint or random_seed")
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from rep_medsam_jax.models.vit import ViTImageEncoder  # noqa: PLC0415

    config = VIT_VARIANTS[variant]
    dummy = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    # Jitted: op-by-op initialisation of a ViT takes seconds even for the tiny test variant.
    variables = jax.jit(ViTImageEncoder(config).init)(jax.random.PRNGKey(random_seed), dummy)
    return Teacher(config, {"params": variables["params"]},
                   f"random:{variant}:seed{random_seed}", compute_dtype)


def make_encode_fn(teacher: Teacher, batch_size: int,
                   teacher_input_mode: str = "device") -> Callable[[dict], np.ndarray]:
    """A function batch -> (n, g, g, C) float32 for a ``prepare_batch`` dict of n <= batch_size
    slices (mode ``teacher_input_mode``), jitted once for a fixed padded batch split over the
    local devices. In ``device`` mode the 1024 inputs are made inside the same function."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from rep_medsam_jax.mesh import batch_sharding, make_mesh, replicated_sharding  # noqa: PLC0415
    from rep_medsam_jax.models.vit import ViTImageEncoder  # noqa: PLC0415

    devices = jax.local_devices()      # each host computes its own shards
    mesh = make_mesh(devices)
    data_sharding = batch_sharding(mesh)
    replicated = replicated_sharding(mesh)
    padded = -(-batch_size // len(devices)) * len(devices)
    model = ViTImageEncoder(teacher.config, dtype=jnp.dtype(teacher.compute_dtype))

    @jax.jit
    def encode(variables: dict, batch: dict) -> jax.Array:
        images = device_teacher_inputs(batch) if "images" in batch else batch["inputs"]
        embedding, _ = model.apply(variables, images)
        return embedding.astype(jnp.float32)

    variables = jax.device_put(teacher.variables, replicated)

    def run(batch: dict) -> np.ndarray:
        arrays = {key: value for key, value in batch.items() if key != "slice"}
        count = next(iter(arrays.values())).shape[0]
        if count > padded:
            raise ValueError(f"batch of {count} > {padded}")
        filled = {}
        for key, value in arrays.items():
            full = np.zeros((padded,) + value.shape[1:], value.dtype)
            full[:count] = value
            if key in ("in_hw", "out_hw"):
                full[count:] = 1       # padding rows: a 1 x 1 region, never NaN
            filled[key] = full
        out = encode(variables, jax.device_put(filled, data_sharding))
        return np.asarray(jax.device_get(out))[:count]

    return run


# --------------------------------------------------------------------------------------------
# Host part of each batch, prepared ahead of the device
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Slices [start, stop) of shard ``shard`` (never crossing a shard's end)."""

    shard: int
    start: int
    stop: int


def plan_batches(shards: list[int], slices_per_shard: int, num_slices: int,
                 batch_size: int) -> list[BatchPlan]:
    plans = []
    for shard in shards:
        end = min((shard + 1) * slices_per_shard, num_slices)
        for start in range(shard * slices_per_shard, end, batch_size):
            plans.append(BatchPlan(shard, start, min(start + batch_size, end)))
    return plans


class BatchInputs:
    """grain source: item j = the host part of batch ``plans[j]`` (``prepare_batch``'s dict
    plus ``slice``: (n,) int64 slice numbers)."""

    def __init__(self, dataset_dir: str, split: str, first_record: np.ndarray,
                 plans: list[BatchPlan], image_size: int, mode: str):
        self.dataset_dir, self.split = dataset_dir, split
        self.first_record, self.plans = first_record, plans
        self.image_size, self.mode = image_size, mode
        self._records = open_split(dataset_dir, split)

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, item: int) -> dict[str, Any]:
        plan = self.plans[item]
        records = [self._records[int(self.first_record[index])]
                   for index in range(plan.start, plan.stop)]
        batch = prepare_batch([r["image"] for r in records], [r["image_hw"] for r in records],
                              self.mode, self.image_size)
        batch["slice"] = np.arange(plan.start, plan.stop, dtype=np.int64)
        return batch

    def __repr__(self) -> str:
        return f"BatchInputs({self.dataset_dir!r}, {self.split!r}, {len(self.plans)} batches)"


def _iterate_inputs(source: BatchInputs, worker_count: int):
    if worker_count <= 0:
        for item in range(len(source)):
            yield source[item]
        return
    import grain  # noqa: PLC0415

    from input_pipeline.grain_workers import allow_worker_processes  # noqa: PLC0415

    allow_worker_processes()
    sampler = grain.samplers.IndexSampler(num_records=len(source),
                                          shard_options=grain.sharding.NoSharding(),
                                          shuffle=False, num_epochs=1, seed=0)
    # Each item is a whole batch (16 slices, a few MiB): grain's default read-ahead of 500
    # items would hold gigabytes per worker, so read a few batches ahead only.
    yield from grain.DataLoader(data_source=source, sampler=sampler, worker_count=worker_count,
                                worker_buffer_size=2,
                                read_options=grain.ReadOptions(num_threads=2,
                                                               prefetch_buffer_size=4))


_DONE = object()


def prefetch(items, depth: int = 2):
    """Iterate ``items`` on a background thread, ``depth`` items ahead (the host prepares the
    next batches while the device runs this one). Errors are raised in the consumer; leaving
    the loop early stops the thread."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as err:  # noqa: BLE001  (handed to the consumer)
            buffer.put(err)

    thread = threading.Thread(target=produce, name="teacher-inputs", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# --------------------------------------------------------------------------------------------
# Layout and manifest
# --------------------------------------------------------------------------------------------

def shard_path(cache_dir: Any, shard: int) -> Any:
    """``CACHE/shards/<shard>.bin`` (a pathlib.Path, or an etils.epath.Path for a URL)."""
    return as_path(cache_dir) / "shards" / f"{shard:06d}.bin"


def slices_per_shard_for(shard_mb: float, nbytes: int) -> int:
    """Slices per shard file: as many as fit in ``shard_mb`` * 2^20 bytes, at least one."""
    return max(1, int(shard_mb * 2**20) // nbytes)


def _manifest(split: str, table: SliceTable, slices_per_shard: int, teacher: Teacher,
              storage_dtype: str, teacher_input_mode: str) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "split": split,
            "num_records": int(table.record_to_slice.shape[0]), "num_slices": table.num_slices,
            "slices_per_shard": slices_per_shard,
            "num_shards": -(-table.num_slices // slices_per_shard),
            "embedding_shape": list(teacher.embedding_shape), "storage_dtype": storage_dtype,
            "slice_nbytes": slice_nbytes(teacher.embedding_shape, storage_dtype),
            "teacher_input": teacher_input_mode,
            "teacher": {"variant": teacher.config.name, "img_size": teacher.config.img_size,
                        "weights": teacher.weights, "compute_dtype": teacher.compute_dtype},
            "slice_table_sha256": table.fingerprint()}


def _check_format(cache_dir: Path, stored: dict[str, Any]) -> None:
    if stored.get("format") != CACHE_FORMAT:
        raise TeacherCacheError(f"{cache_dir}/manifest.json: not a teacher cache (format "
                                f"{stored.get('format')!r})")
    if stored.get("version") != CACHE_VERSION:
        raise TeacherCacheError(
            f"{cache_dir}: teacher cache version {stored.get('version')}, this code reads "
            f"version {CACHE_VERSION}; rebuild it into a new --out folder with "
            "python -m input_pipeline.teacher_cache")


def _ensure_manifest(cache_dir: Path, manifest: dict[str, Any],
                     table: SliceTable) -> None:
    path = cache_dir / "manifest.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        _check_format(cache_dir, stored)
        if stored != manifest:
            changed = sorted(k for k in set(stored) | set(manifest)
                             if stored.get(k) != manifest.get(k))
            raise TeacherCacheError(
                f"{cache_dir} holds a cache of another dataset, split, teacher or layout "
                f"(differs in {', '.join(changed)}); use another --out folder")
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(cache_dir / "record_to_slice.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, table.record_to_slice)
    # Written last: a folder with a manifest has everything but (some) shards.
    write_text_atomic(path, json.dumps(manifest, indent=1))


def _remove_own_temporaries(cache_dir: Path, owned: set[int]) -> None:
    """Delete temporary shard files a killed run of this host left (other hosts' are theirs).
    A URL cache has none: its temporaries are local files."""
    if is_url(cache_dir):
        return
    pattern = re.compile(r"^\.tmp-[0-9a-f]+-(\d{6})\.bin$")
    for path in (cache_dir / "shards").glob(".tmp-*"):
        match = pattern.match(path.name)
        if match and int(match.group(1)) in owned:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CacheRunReport:
    computed_shards: list[int]
    computed_slices: int
    already_present: int
    owned_shards: int
    total_shards: int
    missing_after: int
    seconds: float
    bytes_per_embedding: int
    examples_per_slice: float

    @property
    def bytes_per_million_examples(self) -> float:
        return self.bytes_per_embedding * 1e6 / self.examples_per_slice


def build_teacher_cache(dataset_dir: str | Path, split: str, cache_dir: str | Path,
                        teacher: Teacher, *, batch_size: int = 8,
                        storage_dtype: str = "float16", shard_mb: float = DEFAULT_SHARD_MB,
                        teacher_input_mode: str = "device", process_index: int = 0,
                        process_count: int = 1, worker_count: int = 0,
                        encode_fn: Callable[[dict], np.ndarray] | None = None,
                        on_shard_written: Callable[[int], None] | None = None,
                        log: Callable[[str], None] = _LOG.info) -> CacheRunReport:
    """Compute this host's missing shards (see the module docstring). Resumable, idempotent.

    encode_fn: replaces the jitted teacher; gets ``prepare_batch`` dicts plus ``slice`` (tests
    use it to count what is computed). on_shard_written(k): called after shard k is on disk.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    if teacher_input_mode not in TEACHER_INPUT_MODES:
        raise ValueError(f"teacher_input_mode must be one of {TEACHER_INPUT_MODES}, "
                         f"got {teacher_input_mode!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    start = time.perf_counter()
    dataset_dir, cache_dir = as_path(dataset_dir), as_path(cache_dir)
    table = slice_table(dataset_dir, split)
    nbytes = slice_nbytes(teacher.embedding_shape, storage_dtype)
    per_shard = slices_per_shard_for(shard_mb, nbytes)
    manifest = _manifest(split, table, per_shard, teacher, storage_dtype, teacher_input_mode)
    _ensure_manifest(cache_dir, manifest, table)
    (cache_dir / "shards").mkdir(exist_ok=True)

    total = manifest["num_shards"]
    owned = [k for k in range(total) if k % process_count == process_index]
    _remove_own_temporaries(cache_dir, set(owned))
    pending = [k for k in owned if not shard_path(cache_dir, k).is_file()]
    log(f"teacher cache {cache_dir}: {table.num_slices} slice(s) of {len(table.record_to_slice)} "
        f"record(s) in {total} shard(s) of {per_shard} slice(s) ({per_shard * nbytes / 2**20:.0f}"
        f" MiB); host {process_index}/{process_count} owns {len(owned)}, "
        f"{len(owned) - len(pending)} already present, {len(pending)} to compute")

    if pending and encode_fn is None:
        encode_fn = make_encode_fn(teacher, batch_size, teacher_input_mode)
    plans = plan_batches(pending, per_shard, table.num_slices, batch_size)
    source = BatchInputs(str(dataset_dir), split, table.first_record, plans,
                         teacher.config.img_size, teacher_input_mode)
    computed, computed_slices = [], 0
    writer = None
    items = prefetch(_iterate_inputs(source, worker_count))
    try:
        for plan, item in zip(plans, items):
            if plan.start == plan.shard * per_shard:           # first batch of a shard
                writer = _ShardWriter(shard_path(cache_dir, plan.shard))
            embeddings = np.asarray(encode_fn(item))
            expected = (plan.stop - plan.start,) + teacher.embedding_shape
            if embeddings.shape != expected:
                raise TeacherCacheError(f"teacher returned {embeddings.shape}, expected {expected}")
            writer.write(encode_slices(embeddings, storage_dtype))
            computed_slices += expected[0]
            if plan.stop == min((plan.shard + 1) * per_shard, table.num_slices):
                writer.commit()
                writer = None
                computed.append(plan.shard)
                log(f"[{len(computed)}/{len(pending)}] shard {plan.shard} written "
                    f"({computed_slices / (time.perf_counter() - start):.2f} slices/s)")
                if on_shard_written is not None:
                    on_shard_written(plan.shard)
    finally:
        items.close()                  # stops the prefetching thread
        if writer is not None:
            writer.abandon()

    missing = sum(not shard_path(cache_dir, k).is_file() for k in range(total))
    report = CacheRunReport(computed, computed_slices, len(owned) - len(pending), len(owned),
                            total, missing, time.perf_counter() - start, nbytes,
                            len(table.record_to_slice) / max(table.num_slices, 1))
    status = "complete" if not missing else f"{missing} shard(s) still missing (other hosts?)"
    log(f"done in {report.seconds:.1f} s; {status}; storage {nbytes / 2**20:.2f} MiB per slice "
        f"({storage_dtype}), {report.bytes_per_million_examples / 1e12:.2f} TB per million "
        f"examples at {report.examples_per_slice:.2f} examples per slice")
    return report


class _ShardWriter:
    """Appends slices to a temporary file beside ``path``; ``commit`` renames it to ``path``.
    For a URL ``path`` the temporary file is local and ``commit`` uploads it as one object
    (all-or-nothing in an object store, which has no rename)."""

    def __init__(self, path: Any):
        import secrets  # noqa: PLC0415
        import tempfile  # noqa: PLC0415

        self.path = path
        if is_url(path):
            handle, name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{path.name}")
            os.close(handle)
            self.temporary = Path(name)
        else:
            self.temporary = path.with_name(f".tmp-{secrets.token_hex(6)}-{path.name}")
        self.handle = open(self.temporary, "wb")  # noqa: SIM115  (closed in commit / abandon)

    def write(self, rows: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(rows).tobytes())

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        if is_url(self.path):
            try:
                upload(self.temporary, self.path)
            finally:
                self.temporary.unlink(missing_ok=True)
        else:
            os.replace(self.temporary, self.path)

    def abandon(self) -> None:
        self.handle.close()
        self.temporary.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

class TeacherCache:
    """Read access: ``cache[record_index]`` -> (g, g, C) embedding: float16 or
    ml_dtypes.bfloat16 as stored, float32 for int8 (decoded). At most ``max_open_files`` shard
    files are open at a time in each process (least recently used closed first); each slice is
    read by seek + readinto. Picklable (open files are not carried over)."""

    def __init__(self, cache_dir: str | Path, max_open_files: int = DEFAULT_MAX_OPEN_FILES):
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.cache_dir = as_path(cache_dir)
        manifest_path = self.cache_dir / "manifest.json"
        if not manifest_path.is_file():
            raise TeacherCacheError(f"{self.cache_dir}: no manifest.json; not a teacher cache "
                                    "(build it with python -m input_pipeline.teacher_cache)")
        self.manifest = json.loads(manifest_path.read_text())
        _check_format(self.cache_dir, self.manifest)
        self.record_to_slice = load_npy(self.cache_dir / "record_to_slice.npy")
        self.max_open_files = max_open_files
        self._files: OrderedDict[int, Any] = OrderedDict()
        # grain reads records on several threads of one process: a shard's file position is
        # shared and the LRU may close a file another thread is reading, so open, seek and
        # read happen under one lock (a slice is one short read; the lock is not the bottleneck).
        self._lock = threading.Lock()

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["embedding_shape"])

    @property
    def storage_dtype(self) -> str:
        return self.manifest["storage_dtype"]

    @property
    def open_files(self) -> int:
        return len(self._files)

    def __len__(self) -> int:
        return int(self.record_to_slice.shape[0])

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.manifest["num_shards"])
                if not shard_path(self.cache_dir, k).is_file()]

    def check_matches(self, dataset_dir: str | Path, split: str, num_records: int) -> None:
        """Raise TeacherCacheError unless this cache is complete and made for that split."""
        problems = []
        if self.manifest["split"] != split:
            problems.append(f"it is for split {self.manifest['split']!r}, not {split!r}")
        elif len(self) != num_records:
            problems.append(f"it covers {len(self)} records, the split has {num_records}")
        elif self.manifest["slice_table_sha256"] != slice_table(dataset_dir, split).fingerprint():
            problems.append("its record -> slice table differs from the dataset's (rebuilt?)")
        missing = self.missing_shards()
        if missing:
            problems.append(f"{len(missing)} of {self.manifest['num_shards']} shard(s) are "
                            f"missing (e.g. {missing[:3]}); finish it with "
                            "python -m input_pipeline.teacher_cache")
        if problems:
            raise TeacherCacheError(f"teacher cache {self.cache_dir} does not fit {dataset_dir} "
                                    f"{split}: " + "; ".join(problems))

    def _file(self, shard: int):
        handle = self._files.get(shard)
        if handle is not None:
            self._files.move_to_end(shard)
            return handle
        path = shard_path(self.cache_dir, shard)
        if not path.is_file():
            raise TeacherCacheError(f"{path}: shard missing (cache incomplete)")
        while len(self._files) >= self.max_open_files:
            self._files.popitem(last=False)[1].close()
        # pathlib or etils.epath (a URL: each read is then one ranged request)
        handle = path.open("rb")  # noqa: SIM115  (closed when evicted or by close())
        self._files[shard] = handle
        return handle

    def slice_embedding(self, slice_number: int) -> np.ndarray:
        from input_pipeline.teacher_storage import decode_slice  # noqa: PLC0415

        per_shard, nbytes = self.manifest["slices_per_shard"], self.manifest["slice_nbytes"]
        shard, position = divmod(int(slice_number), per_shard)
        buffer = bytearray(nbytes)
        with self._lock:
            handle = self._file(shard)
            handle.seek(position * nbytes)
            read = handle.readinto(buffer)
        if read != nbytes:
            raise TeacherCacheError(f"{shard_path(self.cache_dir, shard)}: truncated (slice "
                                    f"{position} of {per_shard} cannot be read)")
        return decode_slice(buffer, self.embedding_shape, self.storage_dtype)

    def __getitem__(self, record: int) -> np.ndarray:
        return self.slice_embedding(int(self.record_to_slice[record]))

    def close(self) -> None:
        with self._lock:
            while self._files:
                self._files.popitem()[1].close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()        # files are reopened in each process
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m input_pipeline.teacher_cache",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", required=True,
                        help="the built dataset (DATA_DIR/med_sam_slices/size256/2.0.0)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", required=True, help="cache folder (created; resumed if present)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--model-dir", help="a converted MedSAM ViT-B model directory")
    weights.add_argument("--checkpoint", help="medsam_vit_b.pth (converted on the fly)")
    weights.add_argument("--random-init", type=int, metavar="SEED",
                         help="random weights (smoke tests only)")
    parser.add_argument("--variant", default="medsam_vit_b", choices=sorted(VIT_VARIANTS),
                        help="ViT variant for --random-init")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per jitted batch")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_MB,
                        help="size of one shard file in MiB (a kill loses at most one shard)")
    parser.add_argument("--dtype", default="float16", choices=STORAGE_DTYPES,
                        help="storage dtype of the embeddings")
    parser.add_argument("--teacher-input", default="device", choices=TEACHER_INPUT_MODES,
                        help="how the 1024 input is made (input_pipeline.teacher_inputs)")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="matmul/conv dtype of the teacher (bfloat16 on GPUs)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes preparing the host part of the batches (0: a thread)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (multi-host runs)")
    parser.add_argument("--process-index", type=int, help="default: jax.process_index()")
    parser.add_argument("--process-count", type=int, help="default: jax.process_count()")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    import jax  # noqa: PLC0415

    if args.distributed:
        jax.distributed.initialize()
    process_index = jax.process_index() if args.process_index is None else args.process_index
    process_count = jax.process_count() if args.process_count is None else args.process_count
    try:
        teacher = load_teacher(model_dir=args.model_dir, checkpoint=args.checkpoint,
                               variant=args.variant, random_seed=args.random_init,
                               compute_dtype=args.compute_dtype)
        report = build_teacher_cache(args.dataset_dir, args.split, args.out, teacher,
                                     batch_size=args.batch_size, storage_dtype=args.dtype,
                                     shard_mb=args.shard_mb,
                                     teacher_input_mode=args.teacher_input,
                                     process_index=process_index, process_count=process_count,
                                     worker_count=args.workers)
    except (TeacherCacheError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if report.missing_after == 0 or process_count > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
