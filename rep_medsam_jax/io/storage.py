"""Paths that may be object-store URLs (``gs://bucket/dir``), for training's files.

A local path stays a :class:`pathlib.Path` and behaves exactly as before. A URL becomes an
``etils.epath.Path``: the same pathlib-like API (``/``, ``exists``, ``is_dir``, ``iterdir``,
``open``, ``read_bytes``, ``write_text``, ``rmtree``) over fsspec, which for ``gs://`` is
gcsfs (installed with the ``train`` extra). Orbax (through tensorstore) and tfds (through
array_record's own GCS reader) take the same URLs.

What an object store lacks, and what stands in for it here:

* rename: a file is written in full locally and uploaded as one object (:func:`upload`); an
  upload is all-or-nothing, so readers see the old object or the whole new one;
* append: a file that grows (``metrics.jsonl``) is kept locally and uploaded whole;
* memory maps: ``.npy`` files are read whole (:func:`load_npy`);
* directories: they exist only through the objects under them (``mkdir`` does nothing).

Pointing every client at a local emulator (tests, docs/training.md "Cloud storage"):
``STORAGE_EMULATOR_HOST`` (gcsfs), ``TENSORSTORE_GCS_HTTP_URL`` with
``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (tensorstore, for orbax), ``CLOUD_STORAGE_EMULATOR_ENDPOINT``
(array_record's reader), ``FSSPEC_GS_TOKEN=anon`` and ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``
(no credential or bucket-layout look-ups).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# The schemes etils.epath serves, and the fsspec package each one needs.
URL_SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

AnyPath = Any   # pathlib.Path for local paths, etils.epath.Path for URLs


class StorageError(ValueError):
    """A URL whose scheme is unknown, or whose file-system package is not installed."""


def is_url(path: str | os.PathLike | None) -> bool:
    """Is ``path`` a URL (``scheme://...``) rather than a local path?"""
    return path is not None and bool(_URL.match(os.fspath(path)))


def check_url(url: str | os.PathLike) -> None:
    """Raise StorageError unless ``url``'s scheme is served here and its package is installed."""
    text = os.fspath(url)
    match = _URL.match(text)
    scheme = match.group(1).lower() if match else ""
    if scheme not in URL_SCHEMES:
        raise StorageError(f"{text}: unsupported URL scheme {scheme + '://'!r}; supported: "
                           + ", ".join(f"{s}://" for s in URL_SCHEMES))
    package = URL_SCHEMES[scheme]
    if importlib.util.find_spec(package) is None:
        hint = ("pip install 'rep-medsam-jax[train]'" if scheme == "gs"
                else f"pip install {package}")
        raise StorageError(f"{text}: reading or writing {scheme}:// needs the {package} package, "
                           f"which is not installed ({hint})")


def as_path(path: str | os.PathLike) -> AnyPath:
    """``pathlib.Path`` for a local path, ``etils.epath.Path`` for a URL (checked first)."""
    if not is_url(path):
        return Path(path)
    check_url(path)
    from etils import epath  # noqa: PLC0415

    return epath.Path(os.fspath(path))


def absolute(path: str | os.PathLike) -> AnyPath:
    """The absolute form of a local path; a URL as it is (URLs are absolute)."""
    return as_path(path) if is_url(path) else Path(path).absolute()


def upload(local_file: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copy a local file to ``url`` as one object (all or nothing)."""
    with open(local_file, "rb") as source, as_path(url).open("wb") as target:
        shutil.copyfileobj(source, target, length=16 << 20)


def download(url: str | os.PathLike, local_file: str | os.PathLike) -> None:
    """Copy the object at ``url`` to a local file."""
    with as_path(url).open("rb") as source, open(local_file, "wb") as target:
        shutil.copyfileobj(source, target, length=16 << 20)


def upload_tree(local_dir: str | os.PathLike, url: str | os.PathLike,
                last: Iterable[str] = ()) -> list[str]:
    """Upload every file under ``local_dir`` to the same relative names under ``url``; the files
    named in ``last`` (relative paths) go after all others, so that their presence means the rest
    is complete. Returns the relative names uploaded, in order."""
    local_dir, target = Path(local_dir), as_path(url)
    last = [name for name in last if (local_dir / name).is_file()]
    names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*")
                   if p.is_file())
    ordered = [n for n in names if n not in last] + last
    for name in ordered:
        upload(local_dir / name, target / name)
    return ordered


@contextlib.contextmanager
def upload_on_success(url: str | os.PathLike) -> Iterator[Path]:
    """Yield a local temporary file path that ends like ``url``'s name; when the block succeeds
    the file is uploaded to ``url`` as one object. On failure nothing is uploaded."""
    name = as_path(url).name
    with tempfile.TemporaryDirectory(prefix="rep-medsam-upload-") as folder:
        local = Path(folder) / name
        yield local
        if not local.exists():
            raise FileNotFoundError(f"nothing was written for {url}")
        upload(local, url)


@contextlib.contextmanager
def local_file(path: str | os.PathLike) -> Iterator[Path]:
    """A local file to write ``path`` through: ``path`` itself when local; for a URL a temporary
    file, uploaded when the block succeeds (for writers that need a real file name)."""
    if not is_url(path):
        yield Path(path)
        return
    with upload_on_success(path) as temporary:
        yield temporary


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """``np.load`` of a ``.npy`` file; ``mmap``: memory-mapped read-only when local (a URL's
    object is read whole: there is nothing to map)."""
    if not is_url(path):
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    return np.load(io.BytesIO(as_path(path).read_bytes()), allow_pickle=False)


@contextlib.contextmanager
def directory_in_place(target: str | os.PathLike, overwrite: bool = False) -> Iterator[AnyPath]:
    """For a URL directory: an object store has no directory rename, so an existing ``target``
    is deleted first (with ``overwrite``) and the block writes into ``target`` itself; on failure
    what it wrote is deleted. Readers must treat a file written last as the mark of a complete
    directory (a MODEL_DIR's ``config.json``)."""
    path = as_path(target)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists (pass overwrite=True / --overwrite)")
        path.rmtree()
    try:
        yield path
    except BaseException:
        with contextlib.suppress(OSError):
            if path.exists():
                path.rmtree()
        raise
