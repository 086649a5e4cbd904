"""Reading PyTorch ``.pth`` files into flat ``{key: np.ndarray}`` dicts.

torch is imported lazily, only here, so nothing else in the package needs it.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np


class CheckpointReadError(ValueError):
    """The file is not a readable PyTorch checkpoint (missing, truncated, corrupt, not a dict)."""


def _import_torch():
    try:
        import torch  # noqa: PLC0415  (lazy on purpose: torch is a convert-only dependency)
    except ImportError as err:  # pragma: no cover - depends on the install
        raise CheckpointReadError(
            "reading a PyTorch checkpoint needs torch: pip install 'rep-medsam-jax[convert]'"
        ) from err
    return torch


def unwrap_state_dict(obj: object, path: str | os.PathLike = "") -> Mapping:
    """The model state dict inside a loaded checkpoint.

    Accepts a raw state dict or one wrapped as ``{"model": state_dict, ...}`` (training
    checkpoints of MedSAM, LiteMedSAM and Rep-MedSAM). A DDP ``module.`` prefix is removed.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not obj:
        raise CheckpointReadError(f"{path}: the state dict is empty")
    non_tensor = [k for k, v in obj.items() if not hasattr(v, "shape")]
    if non_tensor:
        raise CheckpointReadError(
            f"{path}: not a model state dict (entries that are not tensors: {non_tensor[:5]})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a ``.pth`` file as ``{key: float32 / int64 NumPy array}``, with clear errors.

    Only tensors are loaded (``weights_only=True``): a checkpoint cannot run code on load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointReadError(f"{path}: the file is empty")
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointReadError(
            f"{path}: cannot read it as a PyTorch checkpoint (truncated or corrupt?): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    except Exception as err:  # unpickling errors have many types across torch versions
        raise CheckpointReadError(
            f"{path}: cannot read it as a PyTorch checkpoint: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}") from err
    state = unwrap_state_dict(obj, path)
    return {key: value.detach().cpu().numpy() for key, value in state.items()}
