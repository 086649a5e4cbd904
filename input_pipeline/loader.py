"""A grain loader over the built dataset: shuffled, augmented, batched, sharded, resumable.

    loader = make_loader(dataset_dir, "train", batch_size=16, seed=0,
                         augment=FINETUNE_AUGMENT, worker_count=2,
                         process_index=jax.process_index(), process_count=jax.process_count())
    iterator = iter(loader)
    batch = next(iterator)            # dict of NumPy arrays, see `prepare_example`
    state = iterator.get_state()      # bytes: save with the model checkpoint
    ...
    iterator = iter(make_loader(...same arguments...))
    iterator.set_state(state)         # continues with the next unseen batch

What an epoch is. The dataset stores one record per slice with its label map. With
``sampling="slice"`` (the default, as the reference training scripts do) an epoch is one pass
over the slices in a seeded random order, and each time a slice comes up one of its objects is
drawn uniformly at random: every slice once per epoch, whatever its number of objects. With
``sampling="object"`` an epoch is one pass over every (slice, object) pair, so slices with
many objects weigh more (used for evaluation: every object scored once).

Determinism: the order is a seeded permutation per epoch (grain ``IndexSampler``) and each
example's object draw and augmentation come from a generator seeded by (seed, position in the
stream), so a run is reproduced exactly by the same arguments, and a restored iterator state
continues with the same draws; the batches do depend on ``worker_count``
(each worker batches its own share), so keep it fixed across a restart.

Per-host sharding: every host walks the same seeded stream of global batches (the stream one
process would read) and loads only its own rows of each: host i of n takes rows
i*b .. (i+1)*b - 1 of every global batch of n*b (:class:`ProcessSliceSampler`), with the same
per-example augmentation seed. So n hosts train on exactly the batches one host would, and a
run's data does not depend on the number of hosts. The indices are passed in as ints, so a test
can play several hosts in one process.

Several datasets: pass an ``input_pipeline.mixture.Mixture`` (or a list of its ``Source``)
instead of a dataset folder; an epoch is then one pass over the mixture's table (each source's
selected slices, or their objects), and every batch also carries ``source``. Everything else
(hosts, workers, resumption) is the same.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from input_pipeline.augment import NO_AUGMENT, AugmentConfig, augment_example, box_from_mask
from input_pipeline.examples import slice_objects, student_image
from input_pipeline.grain_workers import allow_worker_processes
from input_pipeline.mixture import Mixture, Source, mixture_table
from input_pipeline.tfds_builder import open_split, read_record_index
from rep_medsam_jax.io.storage import as_path

SAMPLINGS = ("slice", "object")


class ExampleSource:
    """grain random-access source over a split of the built dataset.

    sampling "slice": ``source[i]`` is record i (a slice) with ``index`` = i and ``label`` = 0
    (the object is drawn later, :class:`ChooseObject`). sampling "object": item i is the i-th
    (slice, object) pair of the record index, with ``label`` set to that object's value.
    With a teacher cache, ``teacher_embedding`` ((g, g, C) in the cache's storage dtype) is the
    record's. Picklable (grain sends it to worker processes).
    """

    def __init__(self, dataset_dir: str | Path, split: str,
                 teacher_cache_dir: str | Path | None = None, sampling: str = "slice"):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.dataset_dir = str(dataset_dir)
        self.split = split
        self.sampling = sampling
        self.teacher_cache_dir = str(teacher_cache_dir) if teacher_cache_dir else None
        self._records = open_split(self.dataset_dir, split)
        self._object_record = self._object_label = None
        if sampling == "object":
            index = read_record_index(self.dataset_dir, split)
            self._object_record = index["object_record"]
            self._object_label = index["object_label"]
        self._teacher = None
        if self.teacher_cache_dir:
            from input_pipeline.teacher_cache import TeacherCache  # noqa: PLC0415

            self._teacher = TeacherCache(self.teacher_cache_dir)
            self._teacher.check_matches(self.dataset_dir, split, len(self._records))

    def __len__(self) -> int:
        if self._object_record is not None:
            return int(self._object_record.shape[0])
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = 0
        if self._object_record is not None:
            label = int(self._object_label[index])
            index = int(self._object_record[index])
        record = dict(self._records[index])
        record["index"] = np.int64(index)
        record["label"] = np.int32(label)
        if self._teacher is not None:
            record["teacher_embedding"] = self._teacher[index]
        return record

    def __repr__(self) -> str:
        # grain compares repr() of the source when restoring an iterator state. Name the
        # dataset by its name/config/version and size, not its absolute path: a WORKDIR or a
        # dataset moved to another folder or mount (another host, a copied run) must resume.
        name = "/".join(Path(self.dataset_dir).parts[-3:])
        return (f"ExampleSource(dataset={name!r}, split={self.split!r}, "
                f"records={len(self._records)}, sampling={self.sampling!r}, "
                f"teacher_cache={self._teacher is not None})")


class MixtureSource:
    """grain random-access source over a mixture's table (``input_pipeline.mixture``).

    ``source[i]`` is row i's record from its source's ``ExampleSource`` with ``label`` (0 with
    sampling "slice") and ``source`` (int32) set; ``index`` is the record in its own split.
    Picklable (grain sends it to worker processes).
    """

    def __init__(self, mixture: Mixture | Sequence[Source], sampling: str = "slice"):
        self.mixture = mixture if isinstance(mixture, Mixture) else Mixture(tuple(mixture))
        self.sampling = sampling
        self.table = mixture_table(self.mixture, sampling)
        self._sources = [ExampleSource(s.dataset_dir, s.split, s.teacher_cache_dir, "slice")
                         for s in self.mixture.sources]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        number = int(self.table.source[index])
        record = self._sources[number][int(self.table.record[index])]
        record["label"] = np.int32(self.table.label[index])
        record["source"] = np.int32(number)
        return record

    def __repr__(self) -> str:
        # grain compares repr() when restoring an iterator state: name each source by its
        # dataset's name/config/version and a digest of its record index, never its path, so
        # that a moved dataset resumes and another dataset with the same name does not.
        sources = "; ".join(
            f"{s.describe()} [{fingerprint}] teacher_cache={s.teacher_cache_dir is not None}"
            for s, fingerprint in zip(self.mixture.sources, self.table.fingerprints))
        return (f"MixtureSource(seed={self.mixture.seed}, sampling={self.sampling!r}, "
                f"rows={len(self.table)}, sources=[{sources}])")


def choose_object(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Draw one of the slice's objects uniformly (``label``), as the reference scripts do."""
    objects = slice_objects(np.asarray(record["labels"]))
    if objects.size == 0:       # the builder keeps only slices with objects
        raise ValueError(f"record {int(record['index'])} of {record['case_id']!r} has no object")
    return dict(record, label=np.int32(objects[rng.integers(objects.size)]))


class ChooseObject(grain.transforms.RandomMap):
    """:func:`choose_object` with grain's per-element seeded generator."""

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return choose_object(element, rng)


def prepare_example(record: dict[str, Any], device_images: bool = False) -> dict[str, Any]:
    """A stored record with its chosen object ``label`` -> the model's view (before
    augmentation).

    image (S, S, 3) float32 in [0, 1] (``examples.student_image``), mask (S, S) uint8
    (``labels == label``), box (4,) int32 (its tight box), image_hw (2,) int32, label /
    slice_index int32, index int64 (the record), case_id / modality bytes, teacher_embedding
    when present. The label map itself is not passed on. device_images: the image stays
    the stored uint8, with ``image_region`` (4,) int32 [0, 0, newh, neww) for the device to
    normalise (``device_augment.finish_images``).
    """
    example = {k: v for k, v in record.items() if k not in ("labels", "num_objects")}
    mask = (np.asarray(record["labels"]) == int(record["label"])).astype(np.uint8)
    if not mask.any():
        raise ValueError(f"record {int(record['index'])} of {record['case_id']!r} has no "
                         f"object {int(record['label'])}")
    if device_images:
        example["image"] = np.asarray(record["image"], np.uint8)
        height, width = (int(v) for v in record["image_hw"])
        example["image_region"] = np.array([0, 0, height, width], np.int32)
    else:
        example["image"] = student_image(record["image"], record["image_hw"])
    example["mask"] = mask
    example["box"] = box_from_mask(mask).astype(np.int32)
    example["label"] = np.int32(record["label"])
    example["slice_index"] = np.int32(record["slice_index"])
    return example


class PrepareExample(grain.transforms.Map):
    def __init__(self, device_images: bool = False):
        self.device_images = device_images

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        return prepare_example(element, self.device_images)


class Augment(grain.transforms.RandomMap):
    """``augment_example`` with grain's per-element seeded generator (colour jitter only drawn,
    for the device, with ``device_images``)."""

    def __init__(self, config: AugmentConfig, device_images: bool = False):
        self.config = config
        self.device_images = device_images

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return augment_example(element, rng, self.config, jitter_on_device=self.device_images)


class ProcessSliceSampler:
    """A grain sampler: this process's rows of each global batch of ``base``'s stream.

    Local position j is global position (j // b) * n * b + index * b + j % b (b = the
    per-process batch, n processes), with that position's record and random generator, so the
    k-th local batch is rows index*b .. (index + 1)*b - 1 of the k-th global batch. A finite
    ``base`` ends where its global stream ends: with ``drop_remainder`` after the last full
    global batch (every process gets as many rows), else after the last record (evaluation: the
    last local batch may be short or missing on some processes).
    """

    def __init__(self, base: Any, process_index: int, process_count: int, batch_size: int,
                 drop_remainder: bool = True):
        self.base = base
        self.process_index = process_index
        self.process_count = process_count
        self.batch_size = batch_size
        total = len(base)
        global_batch = batch_size * process_count
        full, rest = divmod(total, global_batch)
        last = 0 if drop_remainder else min(max(rest - process_index * batch_size, 0),
                                             batch_size)
        self._length = total if total >= sys.maxsize else full * batch_size + last
        # grain's DataLoader reads the sharding from the sampler: this one is already sliced.
        self._shard_options = grain.sharding.ShardOptions(shard_index=0, shard_count=1)

    def global_position(self, index: int) -> int:
        batch, row = divmod(index, self.batch_size)
        return (batch * self.process_count + self.process_index) * self.batch_size + row

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} is out of bounds [0, {self._length})")
        record = self.base[self.global_position(index)]
        return grain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)

    def __repr__(self) -> str:
        return (f"ProcessSliceSampler({self.base!r}, process {self.process_index} of "
                f"{self.process_count}, batch {self.batch_size})")


def data_source(data: str | Path | Mixture | Sequence[Source], split: str | None,
                teacher_cache_dir: str | Path | None = None,
                sampling: str = "slice") -> ExampleSource | MixtureSource:
    """The grain source of ``make_loader``: one split of a dataset folder, or a mixture (whose
    sources name their own splits and teacher caches, so ``split`` and ``teacher_cache_dir``
    must then be None)."""
    if isinstance(data, (str, os.PathLike)):
        if split is None:
            raise ValueError(f"make_loader({str(data)!r}): give the split to read")
        return ExampleSource(data, split, teacher_cache_dir, sampling)
    if split is not None or teacher_cache_dir is not None:
        raise ValueError("a mixture's sources name their own split and teacher cache: pass "
                         "split=None and teacher_cache_dir=None")
    return MixtureSource(data, sampling)


def make_loader(data: str | Path | Mixture | Sequence[Source], split: str | None = None, *,
                batch_size: int, seed: int = 0,
                augment: AugmentConfig | None = None, shuffle: bool = True,
                num_epochs: int | None = None, worker_count: int = 0,
                worker_buffer_size: int = 2, process_index: int = 0, process_count: int = 1,
                drop_remainder: bool = True, read_threads: int = 4, read_buffer: int = 32,
                teacher_cache_dir: str | Path | None = None,
                device_images: bool = False, sampling: str = "slice") -> grain.DataLoader:
    """The grain DataLoader of one split of a dataset folder, or of a mixture (see the module
    docstring).

    sampling: "slice" (one pass over slices per epoch, one object drawn per slice) or "object"
    (one pass over every object).
    augment: None for no augmentation (evaluation); num_epochs None repeats forever.
    read_threads / read_buffer: reading threads and records read ahead, per process. grain's
    defaults (16, 500) suit 1-10 KiB records; ours are ~260 KiB and the decode is CPU-bound.
    device_images: images stay uint8 and colour jitter is only drawn; the device finishes them
    (``input_pipeline.device_augment.finish_images``), which saves host CPU time.
    Batches are dicts of arrays with a leading batch axis (B = batch_size).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    source = data_source(data, split, teacher_cache_dir, sampling)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardOptions(shard_index=0, shard_count=1,
                                                  drop_remainder=True),
        shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    if process_count > 1:
        sampler = ProcessSliceSampler(sampler, process_index, process_count, batch_size,
                                      drop_remainder)
    operations: list[Any] = [ChooseObject()] if sampling == "slice" else []
    operations.append(PrepareExample(device_images))
    if augment is not None and augment != NO_AUGMENT:
        operations.append(Augment(augment, device_images))
    operations.append(grain.transforms.Batch(batch_size=batch_size,
                                             drop_remainder=drop_remainder))
    if worker_count > 0:
        allow_worker_processes()
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                            read_options=grain.ReadOptions(num_threads=read_threads,
                                                           prefetch_buffer_size=read_buffer))


def save_iterator_state(iterator: Any, path: str | Path) -> None:
    """Write ``iterator.get_state()`` atomically (so a kill never leaves half a state)."""
    from rep_medsam_jax.io import write_bytes_atomic  # noqa: PLC0415

    write_bytes_atomic(path, iterator.get_state())


def restore_iterator(loader: grain.DataLoader, path: str | Path | None) -> Iterator:
    """A fresh iterator of ``loader``, moved to the saved state when ``path`` exists."""
    iterator = iter(loader)
    if path is not None and as_path(path).exists():
        iterator.set_state(as_path(path).read_bytes())
    return iterator
