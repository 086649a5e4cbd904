"""Compile once per machine: JAX's persistent compilation cache, on by default for training.

The first step of a run compiles the model (1-2 minutes on an H100, several on a CPU); a
restart, the next stage or another run of the same shapes would pay it again. With the cache,
XLA's compiled programs are stored in a folder and loaded instead of recompiled (a cache entry
is keyed by the program, the JAX / XLA version and the device kind, so a stale entry is never
used).

Folder: ``--compilation_cache_dir`` (``train.py``), else ``JAX_COMPILATION_CACHE_DIR``, else
``$XDG_CACHE_HOME/rep_medsam_jax/jax_compilation`` (``~/.cache/...``); ``--nocompilation_cache``
turns it off. Programs that compile in under a second are not stored (JAX's default
``jax_persistent_cache_min_compile_time_secs``).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$JAX_COMPILATION_CACHE_DIR``, else the user's cache folder + rep_medsam_jax."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "rep_medsam_jax" / "jax_compilation"


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Store and reuse compiled programs in ``directory`` (default :func:`default_cache_dir`).
    Call before the first compilation; returns the folder."""
    import jax  # noqa: PLC0415

    folder = Path(directory).expanduser() if directory else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


def disable_compilation_cache() -> None:
    """No persistent cache, even if ``JAX_COMPILATION_CACHE_DIR`` is set."""
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", None)
