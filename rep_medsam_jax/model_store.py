"""The model store: named model and export directories in one user folder.

Nothing is ever downloaded (clinics run offline): a model enters the store when a user converts
a checkpoint they hold (``rep-medsam convert ... --name NAME``) or exports a model directory
(``rep-medsam export MODEL --name NAME``), and ``rep-medsam models`` lists what is there.

Root: ``$REP_MEDSAM_HOME`` when set, else ``$XDG_CACHE_HOME/rep_medsam_jax``, else
``~/.cache/rep_medsam_jax``. Layout::

    <root>/models/<name>/    MODEL_DIR  (config.json + orbax variables; JAX backend, export)
    <root>/exports/<name>/   EXPORT_DIR (export.json + ONNX files; onnx / openvino backends)

Where a command reads a model (``--model``, ``export``'s MODEL_DIR), an existing path always
wins; a bare name (letters, digits, ``.``, ``_``, ``-``; no path separator) that is not an
existing path is looked up in the store. Standard library only: the deploy path imports it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

ENV_VAR = "REP_MEDSAM_HOME"
Kind = Literal["models", "exports"]
# The file that makes a folder a model / export directory.
MARKERS: dict[str, str] = {"models": "config.json", "exports": "export.json"}
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def store_root() -> Path:
    """The store's root folder (it need not exist yet)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "rep_medsam_jax"


def is_store_name(text: str) -> bool:
    """A valid store name: no path separator, does not start with a dot."""
    return bool(_NAME.fullmatch(text))


def store_path(kind: Kind, name: str) -> Path:
    """``<root>/<kind>/<name>``; ValueError for a name that is not a plain store name."""
    if not is_store_name(name):
        raise ValueError(f"{name!r} is not a store name: use letters, digits, '.', '_' and '-' "
                         "(not starting with '.')")
    return store_root() / kind / name


def installed(kind: Kind) -> list[str]:
    """Names of the complete entries of one kind (folders holding their marker file)."""
    folder = store_root() / kind
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir()
                  if entry.is_dir() and not entry.name.startswith(".")
                  and (entry / MARKERS[kind]).is_file())


def resolve(spec: str | os.PathLike, kind: Kind) -> Path:
    """A path, or a store name of ``kind``, -> the directory to read.

    An existing path, or anything that looks like a path (a separator, a leading ``.`` or
    ``~``), is returned as it is (callers report a missing directory themselves); a bare name
    that is no existing path must be in the store, else FileNotFoundError lists what is.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists() or not is_store_name(text):
        return path
    candidate = store_root() / kind / text
    if (candidate / MARKERS[kind]).is_file():
        return candidate
    names = installed(kind)
    listing = ", ".join(names) if names else "none"
    what = "model directory" if kind == "models" else "export directory"
    raise FileNotFoundError(
        f"{text}: no such {what}, and no entry {text!r} in the model store "
        f"{store_root() / kind} (installed: {listing}; set {ENV_VAR} to use another store)")
