"""rep_medsam_jax.io.storage on local paths and URL checks (no server; the gs:// round trip is
tests/test_gcs.py): local paths stay pathlib paths with unchanged behaviour, URLs are recognised
and refused clearly when their scheme or package is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rep_medsam_jax.io import atomic_write
from rep_medsam_jax.io.storage import (StorageError, absolute, as_path, check_url, is_url,
                                       load_npy, local_file, upload_tree)


def test_urls_are_told_from_local_paths():
    assert is_url("gs://bucket/dir") and is_url("s3://b/k") and is_url("HF://x/y")
    for local in ("/tmp/gs:/bucket", "relative/dir", "C:/data", Path("gs:/b"), "gs:/b"):
        assert not is_url(local), local
    assert not is_url(None)


def test_local_paths_stay_pathlib_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert type(as_path("a/b")) is type(Path("a/b")) and as_path("a/b") == Path("a/b")
    assert absolute("a") == tmp_path / "a"
    with local_file(tmp_path / "x.txt") as target:       # the file itself, no temporary
        assert target == tmp_path / "x.txt"
        target.write_text("hello")
    assert (tmp_path / "x.txt").read_text() == "hello"
    np.save(tmp_path / "a.npy", np.arange(6).reshape(2, 3))
    mapped = load_npy(tmp_path / "a.npy", mmap=True)
    assert isinstance(mapped, np.memmap) and mapped.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_unknown_scheme_and_missing_package_are_named(monkeypatch):
    with pytest.raises(StorageError, match=r"ftp://h/x: unsupported URL scheme 'ftp://'"):
        check_url("ftp://h/x")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(StorageError, match=r"gs://b/x: .*needs the gcsfs package.*\[train\]"):
        as_path("gs://b/x")
    # atomic_write checks before anything is written.
    with pytest.raises(StorageError, match="gcsfs"):
        with atomic_write("gs://b/x.json"):
            pass


def test_upload_tree_puts_the_named_files_last(tmp_path, monkeypatch):
    source = tmp_path / "src"
    for name in ("b.txt", "sub/a.txt", "build_params.json", "z.txt"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(name)
    uploaded = []
    monkeypatch.setattr("rep_medsam_jax.io.storage.upload",
                        lambda local, url: uploaded.append(Path(local).name))
    monkeypatch.setattr("rep_medsam_jax.io.storage.as_path", lambda url: Path(url))
    order = upload_tree(source, tmp_path / "dst", last=["build_params.json", "missing.json"])
    assert order == ["b.txt", "sub/a.txt", "z.txt", "build_params.json"]
    assert uploaded == ["b.txt", "a.txt", "z.txt", "build_params.json"]
