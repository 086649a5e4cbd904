"""The JSON sidecar: boxes, label names and the intensity rule of a NIfTI, DICOM or image case.

Next to ``<stem>.nii.gz`` / ``<stem>.png`` / ``<stem>.dcm`` / a series folder ``<stem>/``, a
file ``<stem>.json``::

    {
      "boxes": [[x_min, y_min, x_max, y_max], ...],                # 2D images
      "boxes": [[x_min, y_min, z_min, x_max, y_max, z_max], ...],  # NIfTI / DICOM series
      "labels": ["liver", "spleen"],    # optional: a name for label 1..N, one per box
      "modality": "CT",                 # optional, volumes and DICOM: the intensity rule
      "ct_window": [40, 400]            # optional, with modality CT: [level, width] in HU
    }

Training reads the same file for the intensity rule only (``boxes`` optional there: training
boxes come from the masks).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from rep_medsam_jax.io.errors import MissingBoxesError, SidecarError
from rep_medsam_jax.io.formats import case_name

KEYS = ("boxes", "labels", "modality", "ct_window")


@dataclasses.dataclass(frozen=True)
class Sidecar:
    """The parsed JSON sidecar (see the module docstring); ``boxes`` None when absent and not
    required."""

    boxes: list | None
    labels: tuple[str, ...] | None = None
    modality: str | None = None
    ct_window: tuple[float, float] | None = None


def sidecar_path(path: str | os.PathLike) -> Path:
    """``<folder>/<stem>.json`` for ``<folder>/<stem>.<ext>``."""
    path = Path(path)
    return path.with_name(case_name(path) + ".json")


def read_sidecar(path: str | os.PathLike, *, require_boxes: bool = True) -> Sidecar:
    """Parse and check ``<stem>.json``; raises SidecarError / MissingBoxesError."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SidecarError(f"{path}: cannot read the JSON sidecar: {err}") from None
    if not isinstance(content, dict):
        raise SidecarError(f"{path}: the sidecar must be a JSON object with a 'boxes' list")
    unknown = set(content) - set(KEYS)
    if unknown:
        raise SidecarError(f"{path}: unknown sidecar key(s) {sorted(unknown)}; allowed: "
                           f"{', '.join(KEYS)}")
    if "boxes" not in content and require_boxes:
        raise MissingBoxesError(f"{path}: the sidecar has no 'boxes' key")
    boxes = content.get("boxes")
    if boxes is not None and (not isinstance(boxes, list)
                              or not all(isinstance(b, list) for b in boxes)):
        raise SidecarError(f"{path}: 'boxes' must be a list of boxes, each a list of numbers")
    labels = content.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise SidecarError(f"{path}: 'labels' must be a list of strings")
        if len(labels) != len(boxes or []):
            raise SidecarError(f"{path}: {len(labels)} label(s) for {len(boxes or [])} box(es)")
        labels = tuple(labels)
    modality = content.get("modality")
    if modality is not None and not isinstance(modality, str):
        raise SidecarError(f"{path}: 'modality' must be a string such as \"CT\" or \"MR\"")
    window = content.get("ct_window")
    if window is not None:
        if (not isinstance(window, list) or len(window) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in window) or window[1] <= 0):
            raise SidecarError(f"{path}: 'ct_window' must be [level, width] with width > 0")
        window = (float(window[0]), float(window[1]))
    return Sidecar(boxes=boxes, labels=labels, modality=modality, ct_window=window)


def sidecar_or_none(path: str | os.PathLike) -> Sidecar | None:
    """The sidecar of the case at ``path`` when there is one (:func:`sidecar_path`)."""
    candidate = sidecar_path(path)
    return read_sidecar(candidate) if candidate.is_file() else None
