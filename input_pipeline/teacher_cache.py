"""Teacher-embedding cache for distillation: MedSAM ViT-B over a built dataset, stored once.

    python -m input_pipeline.teacher_cache --dataset-dir DATA/med_sam_slices/size256/2.0.0 \\
        --split train --out CACHE --checkpoint medsam_vit_b.pth [--dtype float16] [--batch-size 16]

What is computed. Examples are per object, but every object of a slice shares the slice's
image, so the teacher runs once per *slice* (the records of one slice are found from the
dataset's ``records-<split>.npz`` without reading images). The teacher's input is made from the
stored slice with the shared preprocessing: the valid (newh, neww) region of the student's uint8
image goes through ``teacher_input(..., size=1024, keep_aspect=True)`` (scikit-image order 3,
longest side to 1024, min-max to [0, 1], zero-padded bottom/right). The student's 256 input is
the same uint8 region min-max normalised and padded, so both 64 x 64 embedding grids cover
exactly the same part of the slice (cell (i, j) is pixels [4i, 4i + 4) x [4j, 4j + 4) of the
256 frame in both). The reference instead squashed the original slice to 1024 x 1024, which
misaligns the grids for non-square slices.

Storage. ``CACHE/shards/<k>.npy`` holds slices [k * B, (k + 1) * B) (B = batch size: one shard is
one jitted batch), as (n, g, g, C) float16, or bfloat16 stored as its uint16 bit pattern;
``CACHE/record_to_slice.npy`` maps each record to its slice; ``CACHE/manifest.json`` says what
was cached with what. One embedding is 64 * 64 * 256 * 2 bytes = 2 MiB, so a million examples
need 2.1 TB divided by the mean number of objects per slice.

Resuming. A shard is written to a temporary file and renamed, so it exists complete or not at
all; a restart skips every existing shard. A kill loses only the batch in flight, which was
never stored, so no stored example is ever computed twice. Hosts split the shards round-robin
(shard k belongs to host k mod n) and never write the same file; on a shared file system the
cache is complete when every host has finished.

Devices. The batch is split over all local devices (a 1-D mesh, data parallel), padded to a
fixed size so the function compiles once. Turning stored images into 1024 inputs runs on the CPU,
in ``--workers`` processes (grain) when asked.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from input_pipeline.examples import teacher_source_image
from input_pipeline.tfds_builder import open_split, read_record_index, records_path
from rep_medsam_jax.io import atomic_write, write_text_atomic
from rep_medsam_jax.io.storage import as_path, is_url, load_npy
from rep_medsam_jax.models.config import VIT_VARIANTS, ViTConfig

CACHE_FORMAT = "rep_medsam_jax.teacher_cache"
CACHE_VERSION = 1
STORAGE_DTYPES = ("float16", "bfloat16")
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
                   storage_dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function (n, T, T, 3) float32 (n <= batch_size) -> (n, g, g, C) in ``storage_dtype``,
    jitted once for a fixed padded batch that is split over the local devices."""
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
    out_dtype = jnp.dtype(storage_dtype)

    @jax.jit
    def encode(variables: dict, images: jax.Array) -> jax.Array:
        embedding, _ = model.apply(variables, images)
        return embedding.astype(out_dtype)     # cast on device: half the bytes to move

    variables = jax.device_put(teacher.variables, replicated)

    def run(images: np.ndarray) -> np.ndarray:
        count = images.shape[0]
        if count > padded:
            raise ValueError(f"batch of {count} > {padded}")
        batch = np.zeros((padded,) + images.shape[1:], np.float32)
        batch[:count] = images
        out = encode(variables, jax.device_put(batch, data_sharding))
        return np.asarray(jax.device_get(out))[:count]

    return run


# --------------------------------------------------------------------------------------------
# Teacher inputs (CPU), optionally in grain worker processes
# --------------------------------------------------------------------------------------------

class ShardInputs:
    """grain source: item j = the teacher inputs of pending shard ``shards[j]``,
    ``{"shard": k, "inputs": (n, T, T, 3) float32}``."""

    def __init__(self, dataset_dir: str, split: str, first_record: np.ndarray,
                 shards: list[int], shard_size: int, image_size: int):
        self.dataset_dir, self.split = dataset_dir, split
        self.first_record = first_record
        self.shards, self.shard_size, self.image_size = shards, shard_size, image_size
        self._records = open_split(dataset_dir, split)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, item: int) -> dict[str, Any]:
        from rep_medsam_jax.preprocess import teacher_input  # noqa: PLC0415

        shard = self.shards[item]
        slices = range(shard * self.shard_size,
                       min((shard + 1) * self.shard_size, len(self.first_record)))
        inputs = []
        for index in slices:
            record = self._records[int(self.first_record[index])]
            region = teacher_source_image(record["image"], record["image_hw"])
            inputs.append(teacher_input(region, size=self.image_size, keep_aspect=True))
        return {"shard": np.int64(shard), "inputs": np.stack(inputs).astype(np.float32)}

    def __repr__(self) -> str:
        return f"ShardInputs({self.dataset_dir!r}, {self.split!r}, {len(self.shards)} shards)"


def _iterate_inputs(source: ShardInputs, worker_count: int):
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
    yield from grain.DataLoader(data_source=source, sampler=sampler, worker_count=worker_count)


# --------------------------------------------------------------------------------------------
# Layout and manifest
# --------------------------------------------------------------------------------------------

def shard_path(cache_dir: Path, shard: int) -> Path:
    return cache_dir / "shards" / f"{shard:06d}.npy"


def _to_storage_bits(array: np.ndarray, storage_dtype: str) -> np.ndarray:
    # np.save cannot describe bfloat16; keep its exact bits as uint16.
    return array.view(np.uint16) if storage_dtype == "bfloat16" else array.astype(np.float16)


def _from_storage_bits(array: np.ndarray, storage_dtype: str) -> np.ndarray:
    if storage_dtype == "bfloat16":
        import ml_dtypes  # noqa: PLC0415

        return array.view(ml_dtypes.bfloat16)
    return array


def _manifest(split: str, table: SliceTable, shard_size: int, teacher: Teacher,
              storage_dtype: str) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "split": split,
            "num_records": int(table.record_to_slice.shape[0]), "num_slices": table.num_slices,
            "shard_size": shard_size, "num_shards": -(-table.num_slices // shard_size),
            "embedding_shape": list(teacher.embedding_shape), "storage_dtype": storage_dtype,
            "teacher": {"variant": teacher.config.name, "img_size": teacher.config.img_size,
                        "weights": teacher.weights, "compute_dtype": teacher.compute_dtype},
            "slice_table_sha256": table.fingerprint()}


def _ensure_manifest(cache_dir: Path, manifest: dict[str, Any],
                     table: SliceTable) -> None:
    path = cache_dir / "manifest.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != manifest:
            changed = sorted(k for k in set(stored) | set(manifest)
                             if stored.get(k) != manifest.get(k))
            raise TeacherCacheError(
                f"{cache_dir} holds a cache of another dataset, split or teacher (differs in "
                f"{', '.join(changed)}); use another --out folder")
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(cache_dir / "record_to_slice.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, table.record_to_slice)
    # Written last: a folder with a manifest has everything but (some) shards.
    write_text_atomic(path, json.dumps(manifest, indent=1))


def _remove_own_temporaries(cache_dir: Path, owned: set[int]) -> None:
    """Delete temporary shard files a killed run of this host left (other hosts' are theirs)."""
    pattern = re.compile(r"^\.tmp-[0-9a-f]+-(\d{6})\.npy$")
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
                        storage_dtype: str = "float16", process_index: int = 0,
                        process_count: int = 1, worker_count: int = 0,
                        encode_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                        on_shard_written: Callable[[int], None] | None = None,
                        log: Callable[[str], None] = _LOG.info) -> CacheRunReport:
    """Compute this host's missing shards (see the module docstring). Resumable, idempotent.

    encode_fn: replaces the jitted teacher (tests use it to count what is computed).
    on_shard_written(k): called after shard k is on disk (tests interrupt the run from here).
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    start = time.perf_counter()
    dataset_dir, cache_dir = as_path(dataset_dir), as_path(cache_dir)
    table = slice_table(dataset_dir, split)
    manifest = _manifest(split, table, batch_size, teacher, storage_dtype)
    _ensure_manifest(cache_dir, manifest, table)
    (cache_dir / "shards").mkdir(exist_ok=True)

    total = manifest["num_shards"]
    owned = [k for k in range(total) if k % process_count == process_index]
    _remove_own_temporaries(cache_dir, set(owned))
    pending = [k for k in owned if not shard_path(cache_dir, k).is_file()]
    log(f"teacher cache {cache_dir}: {table.num_slices} slice(s) of {len(table.record_to_slice)} "
        f"record(s) in {total} shard(s); host {process_index}/{process_count} owns {len(owned)}, "
        f"{len(owned) - len(pending)} already present, {len(pending)} to compute")

    if pending and encode_fn is None:
        encode_fn = make_encode_fn(teacher, batch_size, storage_dtype)
    source = ShardInputs(str(dataset_dir), split, table.first_record, pending, batch_size,
                         teacher.config.img_size)
    computed = []
    for number, item in enumerate(_iterate_inputs(source, worker_count), start=1):
        shard = int(item["shard"])
        tick = time.perf_counter()
        embeddings = np.asarray(encode_fn(item["inputs"]))
        expected = (item["inputs"].shape[0],) + teacher.embedding_shape
        if embeddings.shape != expected:
            raise TeacherCacheError(f"teacher returned {embeddings.shape}, expected {expected}")
        with atomic_write(shard_path(cache_dir, shard)) as tmp, open(tmp, "wb") as handle:
            np.save(handle, _to_storage_bits(embeddings, storage_dtype))
        computed.append(shard)
        log(f"[{number}/{len(pending)}] shard {shard}: {embeddings.shape[0]} embedding(s) "
            f"({time.perf_counter() - tick:.2f} s)")
        if on_shard_written is not None:
            on_shard_written(shard)

    missing = sum(not shard_path(cache_dir, k).is_file() for k in range(total))
    bytes_per_embedding = int(np.prod(teacher.embedding_shape)) * 2
    report = CacheRunReport(computed, len(owned) - len(pending), len(owned), total, missing,
                            time.perf_counter() - start, bytes_per_embedding,
                            len(table.record_to_slice) / max(table.num_slices, 1))
    status = "complete" if not missing else f"{missing} shard(s) still missing (other hosts?)"
    log(f"done in {report.seconds:.1f} s; {status}; storage "
        f"{bytes_per_embedding / 2**20:.2f} MiB per slice, "
        f"{report.bytes_per_million_examples / 1e12:.2f} TB per million examples at "
        f"{report.examples_per_slice:.2f} examples per slice")
    return report


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

class TeacherCache:
    """Read access: ``cache[record_index]`` -> (g, g, C) embedding in the storage dtype
    (float16 or ml_dtypes.bfloat16). Shards are memory-mapped on first use (read whole from a
    URL). Picklable."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = as_path(cache_dir)
        manifest_path = self.cache_dir / "manifest.json"
        if not manifest_path.is_file():
            raise TeacherCacheError(f"{self.cache_dir}: no manifest.json; not a teacher cache "
                                    "(build it with python -m input_pipeline.teacher_cache)")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise TeacherCacheError(f"{self.cache_dir}: not a teacher cache")
        self.record_to_slice = load_npy(self.cache_dir / "record_to_slice.npy")
        self._shards: dict[int, np.ndarray] = {}

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["embedding_shape"])

    @property
    def storage_dtype(self) -> str:
        return self.manifest["storage_dtype"]

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

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._shards:
            path = shard_path(self.cache_dir, shard)
            if not path.is_file():
                raise TeacherCacheError(f"{path}: shard missing (cache incomplete)")
            self._shards[shard] = _from_storage_bits(load_npy(path, mmap=True),
                                                     self.storage_dtype)
        return self._shards[shard]

    def slice_embedding(self, slice_number: int) -> np.ndarray:
        size = self.manifest["shard_size"]
        return np.array(self._shard(slice_number // size)[slice_number % size])

    def __getitem__(self, record: int) -> np.ndarray:
        return self.slice_embedding(int(self.record_to_slice[record]))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_shards"] = {}        # memory maps are reopened in each process
        return state


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
    parser.add_argument("--batch-size", type=int, default=8,
                        help="slices per jitted batch = per shard file")
    parser.add_argument("--dtype", default="float16", choices=STORAGE_DTYPES,
                        help="storage dtype of the embeddings")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="matmul/conv dtype of the teacher (bfloat16 on GPUs)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes preparing the 1024 inputs (0: in this process)")
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
                                     process_index=process_index, process_count=process_count,
                                     worker_count=args.workers)
    except (TeacherCacheError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if report.missing_after == 0 or process_count > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
