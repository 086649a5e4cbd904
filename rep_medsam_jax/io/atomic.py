"""Atomic writes: a file appears complete under its name, or not at all.

The standard library has the pieces (``os.replace`` is an atomic rename on POSIX and Windows
within one file system) but no context manager that also keeps the final file's extension
(writers such as nibabel and OpenCV pick the format from it) and fsyncs before the rename.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from rep_medsam_jax.io.storage import as_path, is_url, upload_on_success


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:          # e.g. directories cannot be opened on Windows: best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed to ``path`` atomically.

    The temporary file lies in the same directory (so ``os.replace`` is a rename, never a copy)
    and ends with the final file name, so writers that pick the format from the extension
    (nibabel's ``.nii.gz``, OpenCV's ``.png``) behave as for ``path``. Its name starts with a dot,
    so case discovery never picks it up. If the block raises (anything, including
    KeyboardInterrupt) the temporary file is deleted and an existing ``path`` is left untouched.

    ``path`` may be a URL (``gs://...``, see :mod:`.storage`): the temporary file is then local
    and uploaded as one object at the end, which is all-or-nothing in an object store.

        with atomic_write(out / "config.json") as tmp:
            tmp.write_text(json.dumps(config))
    """
    if is_url(path):
        with upload_on_success(path) as temporary:
            yield temporary
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".tmp-{secrets.token_hex(6)}-{final.name}")
    try:
        yield temporary
        if not temporary.exists():
            raise FileNotFoundError(f"atomic_write: nothing was written to {temporary}")
        if fsync:            # the data must be on disk before the rename makes it visible
            _fsync_path(temporary)
        os.replace(temporary, final)
        if fsync:
            _fsync_path(final.parent, directory=True)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return as_path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return as_path(path)
