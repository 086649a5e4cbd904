"""The build's records go straight to array_record shards in their order, with no TensorFlow
and no in-memory sort (input_pipeline/record_writer.py)."""

import importlib.util
import json

import pytest

from input_pipeline.record_writer import (OrderedSplitWriter, RecordCountError, shard_count,
                                          shard_ends, streaming_writer)
from input_pipeline.tfds_builder import BuildOptions, build_dataset, open_split, read_record_index
from tests.phantom_data import write_nested_corpus

OPTIONS = BuildOptions(image_size=32, validation_fraction=0.25)


def _quiet(_line):
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_nested_corpus(root / "nested", root / "flat", n2d=4, n3d=2)
    return root / "nested"


def _stored_order(dataset_dir, split):
    source = open_split(dataset_dir, split)
    return [(str(source[i]["case_id"], "utf-8") if isinstance(source[i]["case_id"], bytes)
             else str(source[i]["case_id"]), int(source[i]["slice_index"]))
            for i in range(len(source))]


def _index_order(dataset_dir, split):
    index = read_record_index(dataset_dir, split)
    return [(str(index["case_ids"][c]), int(z)) for c, z in zip(index["case"],
                                                                index["slice_index"])]


def test_a_split_past_tfds_memory_buffer_builds_without_tensorflow_in_index_order(
        corpus, tmp_path, monkeypatch):
    """tfds' own writer keeps records in memory up to MAX_MEM_BUFFER_SIZE, then spills through
    tf.io.gfile: with the buffer at 100 bytes every split spills at once. Without TensorFlow
    installed that spill fails (shown first with tfds' writer); the build's writer never spills
    and stores the records in exactly the record index's order, over the requested shards."""
    from tensorflow_datasets.core import shuffle

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 100)
    if importlib.util.find_spec("tensorflow") is None:
        from tensorflow_datasets.core import writer as writer_lib

        monkeypatch.setattr("input_pipeline.tfds_builder.streaming_writer",
                            lambda expected: _nothing())      # tfds' writer, as before
        with pytest.raises(Exception, match="tensorflow"):
            build_dataset(corpus, tmp_path / "tfds_writer", OPTIONS, log=_quiet)
        assert writer_lib.Writer.__name__ == "Writer"
        monkeypatch.undo()
        monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 100)

    result = build_dataset(corpus, tmp_path / "data", OPTIONS, log=_quiet, num_shards=3)
    for split, size in result.split_sizes.items():
        assert size >= 3
        assert _stored_order(result.dataset_dir, split) == _index_order(result.dataset_dir, split)
        files = sorted(result.dataset_dir.glob(f"*-{split}.array_record-*"))
        assert len(files) == 3
        info = json.loads((result.dataset_dir / "dataset_info.json").read_text())
        lengths = [int(n) for s in info["splits"] if s["name"] == split
                   for n in s["shardLengths"]]
        assert lengths == [b - a for a, b in zip([0, *shard_ends(size, 3)[:-1]],
                                                 shard_ends(size, 3))]
    # tfds' writer is back once the build is over.
    from tensorflow_datasets.core import writer as writer_lib
    assert writer_lib.Writer.__name__ == "Writer"


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def test_shard_count_and_boundaries():
    assert shard_count(10, 2**30 // 4, None) == 3            # ceil(10 / 4) shards of 1 GiB
    assert shard_count(10, 100, None) == 1
    assert shard_count(10, 100, 4) == 4
    assert shard_count(3, 100, 8) == 3                         # never more shards than records
    assert shard_ends(10, 3) == [3, 7, 10]
    assert shard_ends(7, 7) == list(range(1, 8))
    with pytest.raises(RecordCountError):
        shard_count(0, 100, None)


class _Serializer:
    def serialize_example(self, example):
        return bytes(example)


class _Template:
    def __init__(self, folder):
        self.folder = folder

    def sharded_filepath(self, shard_index, num_shards):
        return self.folder / f"x-train.array_record-{shard_index:05d}-of-{num_shards:05d}"


def _writer(tmp_path, expected):
    return OrderedSplitWriter(_Serializer(), _Template(tmp_path), "train", True, None,
                              expected_records={"train": expected})


def test_writer_refuses_out_of_order_keys_and_wrong_counts(tmp_path):
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    writer = _writer(tmp_path, 5)
    for key in range(5):
        writer.write(key, [key] * 3)
    assert writer.finalize() == ([5], 15)
    stored = ArrayRecordDataSource([str(p) for p in sorted(tmp_path.glob("x-*"))])
    assert [stored[i] for i in range(5)] == [bytes([k] * 3) for k in range(5)]

    writer = _writer(tmp_path, 5)
    writer.write(0, [0])
    with pytest.raises(RecordCountError, match="in order"):
        writer.write(0, [1])
    writer = _writer(tmp_path, 2)
    writer.write(0, [0])
    writer.write(1, [1])
    with pytest.raises(RecordCountError, match="more than"):
        writer.write(2, [2])
    writer = _writer(tmp_path, 3)
    writer.write(0, [0])
    with pytest.raises(RecordCountError, match="1 records written"):
        writer.finalize()
    with pytest.raises(ValueError, match="disable_shuffling"):
        OrderedSplitWriter(_Serializer(), _Template(tmp_path), "train", False, None,
                           expected_records={"train": 1})


def test_streaming_writer_restores_tfds_writer_after_an_error():
    from tensorflow_datasets.core import writer as writer_lib

    original = writer_lib.Writer
    with pytest.raises(KeyError), streaming_writer({}):
        assert writer_lib.Writer is not original
        raise KeyError("boom")
    assert writer_lib.Writer is original
