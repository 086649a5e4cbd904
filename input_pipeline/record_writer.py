"""Stage 2 of an in-process build: records streamed straight into array_record shards.

tensorflow-datasets' in-process writer (``tensorflow_datasets.core.writer.Writer``) passes every
record of a split through its ``Shuffler``: records are held in memory up to 1 GB, then spilled
to bucket files through ``tf.io.gfile``, i.e. TensorFlow, and finally sorted bucket by bucket in
memory. For this dataset that fails twice at the challenge's size: the spill needs TensorFlow,
which this project does not install (a split of more than about 5,000 slices at 256 x 256 failed
with ``No module named 'tensorflow'``), and with ``disable_shuffling`` the record keys are the
generation indices, which all land in one bucket, so the final sort holds the whole split in
memory (about 200 KB per slice).

The builder yields its records already in their final order (cases in split order, slices in
order; ``records-<split>.npz`` describes exactly that order), so nothing needs sorting. While
the builder runs in this process, :func:`streaming_writer` puts :class:`OrderedSplitWriter` in
the place of tfds' writer: each record is serialised and appended to the current shard file as
it arrives, so memory stays flat and nothing is spilled. The number of records of each split is
known before the first one is written (from the work files' indexes, no image read), which
fixes the shards' boundaries up front; the shard count is ``--num-shards`` when given, else one
shard per ~1 GiB of serialised records (about 5,000 slices at 256, compressed to ~200 MB on
disk), so a million slices make ~190 files, not tfds' 1,024. Files are written into tfds'
temporary ``incomplete.*`` folder, which tfds renames when every split is done, as before.

A Beam build that writes its records on a cluster (``input_pipeline.beam_build``) keeps tfds'
Beam writer, which shuffles on the cluster's workers and needs none of this.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

# One shard per this many serialised bytes when --num-shards is not given.
TARGET_SHARD_BYTES = 1 << 30
# What tfds' array_record adapter writes with: one record per chunk, so any record is read
# alone (random access).
ARRAY_RECORD_OPTIONS = "group_size:1"


class RecordCountError(RuntimeError):
    """A split yielded another number of records than its index promised."""


def shard_count(expected_records: int, record_bytes: int, requested: int | None) -> int:
    """Shards for a split: ``requested`` if given, else one per ``TARGET_SHARD_BYTES`` of
    ``expected_records * record_bytes``; between 1 and the number of records."""
    if expected_records < 1:
        raise RecordCountError("a split with no record cannot be written")
    wanted = requested or math.ceil(expected_records * record_bytes / TARGET_SHARD_BYTES)
    return max(1, min(int(wanted), expected_records))


def shard_ends(num_records: int, num_shards: int) -> list[int]:
    """The exclusive end record of each shard: records spread as evenly as possible."""
    return [round(num_records * (k + 1) / num_shards) for k in range(num_shards)]


class OrderedSplitWriter:
    """A drop-in for ``tensorflow_datasets.core.writer.Writer`` (same constructor, ``write``,
    ``finalize``) that writes records in the order they come, with O(1) memory.

    ``expected_records[split]`` (split = tfds' ``hash_salt``) must hold the split's number of
    records before its first ``write``. Keys must increase (tfds passes generation indices when
    shuffling is disabled): a key out of order is an error, never a silent reorder."""

    def __init__(self, serializer: Any, filename_template: Any, hash_salt: Any,
                 disable_shuffling: bool, example_writer: Any, shard_config: Any = None,
                 ignore_duplicates: bool = False, *, expected_records: Mapping[str, int]):
        if not disable_shuffling:
            raise ValueError("OrderedSplitWriter keeps the generation order; it serves only "
                             "datasets built with disable_shuffling=True")
        file_format = str(getattr(example_writer, "file_format", "array_record"))
        if "array_record" not in file_format.lower():
            raise ValueError(f"OrderedSplitWriter writes array_record files, not {file_format}")
        self._serializer = serializer
        self._template = filename_template
        self._split = hash_salt.decode() if isinstance(hash_salt, bytes) else str(hash_salt)
        self._requested_shards = getattr(shard_config, "num_shards", None)
        self._expected_records = expected_records
        self._ends: list[int] | None = None
        self._shard = -1
        self._file = None
        self._lengths: list[int] = []
        self._count = 0
        self._bytes = 0
        self._last_key: Any = None

    # tfds' Writer interface --------------------------------------------------------------

    def write(self, key: Any, example: Any) -> None:
        if self._last_key is not None and not key > self._last_key:
            raise RecordCountError(f"split {self._split}: record key {key!r} after "
                                   f"{self._last_key!r}; records must come in order")
        self._last_key = key
        data = self._serializer.serialize_example(example=example)
        if self._ends is None:
            self._plan(len(data))
        if self._count >= self._ends[-1]:
            raise RecordCountError(f"split {self._split}: more than the {self._ends[-1]} "
                                   "records its index counted")
        while self._count >= (self._ends[self._shard] if self._shard >= 0 else 0):
            self._open_next_shard()
        self._file.write(data)
        self._count += 1
        self._bytes += len(data)

    def finalize(self) -> tuple[list[int], int]:
        """Close the last shard; (records per shard, serialised bytes) as tfds expects."""
        if self._count == 0:
            raise AssertionError("No examples were yielded.")
        if self._count != self._ends[-1]:
            self._close()
            raise RecordCountError(f"split {self._split}: {self._count} records written, its "
                                   f"index counted {self._ends[-1]}")
        self._close()
        return self._lengths, self._bytes

    # ------------------------------------------------------------------------------------

    def _plan(self, first_record_bytes: int) -> None:
        if self._split not in self._expected_records:
            raise RecordCountError(f"split {self._split}: its number of records was not "
                                   "counted before writing")
        expected = int(self._expected_records[self._split])
        shards = shard_count(expected, first_record_bytes, self._requested_shards)
        self._ends = shard_ends(expected, shards)
        self._lengths = [end - start for start, end in zip([0, *self._ends[:-1]], self._ends)]

    def _open_next_shard(self) -> None:
        from array_record.python import array_record_module  # noqa: PLC0415

        self._close()
        self._shard += 1
        path = self._template.sharded_filepath(shard_index=self._shard,
                                               num_shards=len(self._ends))
        self._file = array_record_module.ArrayRecordWriter(os.fspath(path),
                                                           ARRAY_RECORD_OPTIONS)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def streaming_writer(expected_records: Mapping[str, int]) -> Iterator[None]:
    """While inside, tfds' in-process builds write with :class:`OrderedSplitWriter` (reading
    split sizes from ``expected_records``, which may be filled after entering). Restores tfds'
    writer on exit."""
    from tensorflow_datasets.core import writer as writer_lib  # noqa: PLC0415

    original = writer_lib.Writer

    def make_writer(*args: Any, **kwargs: Any) -> OrderedSplitWriter:
        return OrderedSplitWriter(*args, **kwargs, expected_records=expected_records)

    writer_lib.Writer = make_writer
    try:
        yield
    finally:
        writer_lib.Writer = original
