"""Training sources: a folder of cases -> one validated uint8 image + integer label map per case.

Two formats, both read through :mod:`rep_medsam_jax.io` (the readers, uint8 rules, sidecar and
orientation of inference):

* Challenge ``.npz``. Images under ``imgs`` ((H, W, 3) or (H, W) for 2D, (D, H, W) for 3D,
  uint8), ground truth under ``gts`` (label map of the image's spatial shape, 0 = background)
  either in the same file (the challenge's training files) or in a file of the same name in a
  ``gts/`` folder (the evaluation layout, and what :mod:`input_pipeline.phantoms` writes).
  Cases are found at any depth (the challenge's ``CT/AbdomenCT/*.npz`` tree); the separate
  ground truth of ``D/X.npz`` is ``D/gts/X.npz`` or, when D is an ``inputs`` folder,
  ``D/../gts/X.npz``. 2D or 3D: by the name prefix when there is one (``2D...`` / ``3D...``,
  the challenge's dispatch rule), else by the label map's rank. Stored ``boxes`` are not needed
  for training (boxes are derived from the masks) but are checked when present: a box past the
  image means the case does not fit its annotations.
* NIfTI pairs (the nnU-Net / Medical Segmentation Decathlon layout), at any depth:
  ``D/imagesTr/X.nii.gz`` (or ``X_0000.nii.gz``; other channels are ignored) with
  ``D/labelsTr/X.nii.gz``; the folder names ``images`` / ``labels`` work too. Volumes are
  reoriented to axial (D, H, W) slices and converted to uint8 with the same rules as inference
  (:mod:`rep_medsam_jax.io.nifti`): CT windowing (level / width per anatomy), else 0.5 / 99.5
  percentile clipping. The modality comes from a per-case sidecar ``X.json`` next to the image
  (``{"modality": "CT", "ct_window": [40, 400]}``; the inference sidecar schema of
  :mod:`rep_medsam_jax.io.sidecar`, ``boxes`` optional), else ``D/dataset.json``
  (``"modality": {"0": "CT"}`` or ``"channel_names": {"0": "CT"}``), else the caller's default.

Every problem with one case raises a :class:`rep_medsam_jax.io.CaseError` subclass whose message
names the file, so the dataset builder can report it and go on with the next case.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rep_medsam_jax.io.boxes import validate_boxes
from rep_medsam_jax.io.errors import CaseError, CaseReadError, LabelMapError
from rep_medsam_jax.io.formats import NIFTI_SUFFIXES, is_3d_name
from rep_medsam_jax.io.labels import integer_labels
from rep_medsam_jax.io.nifti import load_nifti, model_volume, scalar_volume
from rep_medsam_jax.io.npz import challenge_image, read_npz, require
from rep_medsam_jax.io.orientation import three_axes, volume_to_dhw
from rep_medsam_jax.io.sidecar import read_sidecar

NIFTI_IMAGE_DIRS = ("imagesTr", "images")
NIFTI_LABEL_DIRS = ("labelsTr", "labels")


class MissingLabelsError(CaseError):
    """No ground truth for the case: no ``gts`` key and no matching file in ``gts/``."""


class EmptyLabelsError(CaseError):
    """The label map has no foreground: the case has nothing to train on."""


class ConstantImageError(CaseError):
    """Every pixel of the image has the same value: it carries no information."""


class DuplicateCaseError(ValueError):
    """Two files give the same case id (the split by case needs unique ids)."""


@dataclasses.dataclass(frozen=True)
class CaseSource:
    """Where one training case lives.

    label_path None: the labels are in the image npz under ``gts``.
    modality / ct_window: NIfTI intensity rule (npz cases are already uint8).
    """

    case_id: str
    kind: Literal["npz", "nifti"]
    image_path: Path
    label_path: Path | None = None
    modality: str | None = None
    ct_window: tuple[float, float] | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this case's content on disk (for the builder's per-case cache)."""
        files = [self.image_path] + ([self.label_path] if self.label_path else [])
        sidecar = self.image_path.with_name(self.case_id + ".json")
        if self.kind == "nifti" and sidecar.is_file():
            files.append(sidecar)
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return {"case_id": self.case_id, "kind": self.kind, "files": stats,
                "modality": self.modality, "ct_window": self.ct_window}


@dataclasses.dataclass(eq=False)
class TrainingCase:
    """One case, validated.

    image: (H, W, 3) uint8 for 2D, (D, H, W) uint8 for 3D.
    labels: (H, W) / (D, H, W) uint8 or uint16, 0 = background, k = object k.
    """

    case_id: str
    modality: str
    is_3d: bool
    image: np.ndarray
    labels: np.ndarray

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0]) if self.is_3d else 1

    def slice(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, labels (H, W)) of axial slice ``index`` (0 for 2D)."""
        if not self.is_3d:
            return self.image, self.labels
        return np.repeat(self.image[index][:, :, None], 3, axis=2), self.labels[index]

    def foreground_slices(self) -> np.ndarray:
        """Indices of the slices with at least one labelled pixel, ascending."""
        if not self.is_3d:
            return np.arange(1) if self.labels.any() else np.arange(0)
        return np.flatnonzero(self.labels.reshape(self.labels.shape[0], -1).any(axis=1))


# --------------------------------------------------------------------------------------------
# Modality from names and metadata
# --------------------------------------------------------------------------------------------

def modality_from_name(case_id: str) -> str:
    """``2DBox_CT_0001`` / ``3DBox_MR_x`` / ``CT_AbdomenCT1K_0001`` -> ``CT`` / ``MR`` / ``CT``.

    The challenge names start with the modality, after an optional ``2DBox_`` / ``3DBox_`` /
    ``2D_`` / ``3D_`` prefix. A name without an underscore gives ``"unknown"``.
    """
    parts = case_id.split("_")
    if parts and parts[0] in ("2DBox", "3DBox", "2D", "3D"):
        parts = parts[1:]
    return parts[0] if len(parts) > 1 and parts[0] else "unknown"


def _dataset_json_modality(root: Path) -> str | None:
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    for key in ("modality", "channel_names"):       # MSD, nnU-Net v2
        table = content.get(key) if isinstance(content, dict) else None
        if isinstance(table, dict) and isinstance(table.get("0"), str):
            return table["0"]
    return None


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------

def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_nifti(name: str) -> bool:
    return any(name.lower().endswith(suffix) for suffix in NIFTI_SUFFIXES)


def _walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """(folder, visible sub-folder names, visible file names) for every folder under ``root``,
    depth first in name order. Hidden entries (``.name``) are skipped; symbolic links to folders
    are followed once (a link back up the tree is not walked again)."""
    seen: set[Path] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        dirs, files = [], []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise NotADirectoryError(f"cannot list {folder}: {err}") from err
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
        yield folder, dirs, files
        stack.extend(folder / d for d in reversed(dirs))


def _npz_sources(folder: Path, files: list[str], gts_claimed: set[Path]) -> list[CaseSource]:
    """The npz cases of one folder; ground truth in ``folder/gts/`` or, for an ``inputs``
    folder, in ``folder/../gts/`` (those ground-truth files are added to ``gts_claimed``)."""
    gts_dirs = [folder / "gts"] + ([folder.parent / "gts"] if folder.name == "inputs" else [])
    gts_dirs = [d for d in gts_dirs if d.is_dir()]
    found = []
    for name in files:
        if not name.endswith(".npz"):
            continue
        label = next((d / name for d in gts_dirs if (d / name).is_file()), None)
        if label is not None:
            gts_claimed.add(label.resolve())
        found.append(CaseSource(name[: -len(".npz")], "npz", folder / name, label))
    return found


def _nifti_sources(folder: Path, dirs: list[str], default_modality: str | None,
                   ct_window: tuple[float, float] | None) -> list[CaseSource]:
    """The NIfTI pairs of ``folder/imagesTr`` + ``folder/labelsTr`` (or images / labels)."""
    image_dir = next((folder / d for d in NIFTI_IMAGE_DIRS if d in dirs), None)
    if image_dir is None:
        return []
    label_dir = next((folder / d for d in NIFTI_LABEL_DIRS if d in dirs), None)
    folder_modality = _dataset_json_modality(folder) or default_modality

    def label_for(stem: str) -> Path | None:
        if label_dir is None:
            return None
        return next((label_dir / (stem + s) for s in NIFTI_SUFFIXES
                     if (label_dir / (stem + s)).is_file()), None)

    found = []
    names = sorted(e.name for e in os.scandir(image_dir)
                   if e.is_file() and not e.name.startswith(".") and _is_nifti(e.name))
    for name in names:
        path = image_dir / name
        stem = _nifti_stem(path)
        label = label_for(stem)
        channel = stem[-4:] if stem[-5:-4] == "_" and stem[-4:].isdigit() else None
        if label is None and channel is not None and label_for(stem[:-5]) is not None:
            if channel != "0000":        # nnU-Net: X_0000 is channel 0 of case X; the
                continue                 # other channels are not used
            stem, label = stem[:-5], label_for(stem[:-5])
        found.append(CaseSource(stem, "nifti", path, label, modality=folder_modality,
                                ct_window=ct_window))
    return found


def discover_sources(roots: str | Path | Sequence[str | Path], *,
                     default_modality: str | None = None,
                     ct_window: tuple[float, float] | None = None) -> list[CaseSource]:
    """All training cases at any depth under one or several roots, sorted by case id.

    * npz: every ``.npz`` file in any folder is a case, except a ground-truth file: one in a
      ``gts/`` folder whose name matches an image in the folder above it (``D/X.npz`` +
      ``D/gts/X.npz``) or in its sibling ``inputs/`` folder (``D/inputs/X.npz`` +
      ``D/gts/X.npz``). So ``CT/AbdomenCT/*.npz`` (the challenge's training tree) and the
      evaluation layout are both read, at whatever depth they sit.
    * NIfTI: every folder holding ``imagesTr/`` (or ``images/``) gives the pairs with its
      ``labelsTr/`` (or ``labels/``); see the module docstring.

    Hidden files and folders (``.name``) are ignored. The case id is the file stem, so it must
    be unique over all roots: two files giving the same id raise DuplicateCaseError naming both
    (the same file reached twice, through overlapping roots or a link, counts once).
    default_modality / ct_window: the NIfTI intensity rule when neither a per-case sidecar nor
    ``dataset.json`` names one. Raises NotADirectoryError if a root is not a folder.
    """
    root_list = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    if not root_list:
        raise NotADirectoryError("no source folder given")
    for root in root_list:
        if not root.is_dir():
            raise NotADirectoryError(f"source folder {root} does not exist or is not a folder")

    npz_cases: list[CaseSource] = []
    gts_claimed: set[Path] = set()
    nifti_cases: list[CaseSource] = []
    for root in root_list:
        for folder, dirs, files in _walk(root):
            if folder.name in NIFTI_IMAGE_DIRS + NIFTI_LABEL_DIRS and any(
                    (folder.parent / d).is_dir() for d in NIFTI_IMAGE_DIRS):
                continue                 # read through the pair's parent folder
            npz_cases += _npz_sources(folder, files, gts_claimed)
            nifti_cases += _nifti_sources(folder, dirs, default_modality, ct_window)

    sources: dict[str, CaseSource] = {}
    seen_files: set[Path] = set()
    for source in npz_cases + nifti_cases:
        real = source.image_path.resolve()
        if source.kind == "npz" and real in gts_claimed:
            continue                     # ground truth of another case, not a case
        if real in seen_files:
            continue
        seen_files.add(real)
        if source.case_id in sources:
            raise DuplicateCaseError(
                f"case id {source.case_id!r} is given by both {sources[source.case_id].image_path}"
                f" and {source.image_path}; case ids must be unique")
        sources[source.case_id] = source
    return [sources[key] for key in sorted(sources)]


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------

def _check_content(image: np.ndarray, labels: np.ndarray, where: str) -> None:
    if image.min() == image.max():
        raise ConstantImageError(f"{where}: every pixel has the value {int(image.min())}; "
                                 "a constant image carries nothing to learn from")
    if not labels.any():
        raise EmptyLabelsError(f"{where}: the label map is all background (0): no object to "
                               "train on")


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

def _read_npz_case(source: CaseSource) -> TrainingCase:
    path, where = source.image_path, str(source.image_path)
    arrays, keys = read_npz(path, ("imgs", "gts", "boxes"))
    image = require(arrays, keys, "imgs", path, "the image")
    if source.label_path is not None:
        label_arrays, _ = read_npz(source.label_path, ("gts",))
        if "gts" not in label_arrays:
            raise MissingLabelsError(f"{source.label_path}: missing key 'gts' (the labels)")
        labels = label_arrays["gts"]
    elif "gts" in arrays:
        labels = arrays["gts"]
    else:
        raise MissingLabelsError(f"{where}: no ground truth: no 'gts' key in the file and no "
                                 f"gts/{path.name} beside it")
    labels = integer_labels(labels, f"{source.label_path or where} (gts)")

    name = source.case_id
    is_3d = is_3d_name(name) if name[:2] in ("2D", "3D") else labels.ndim == 3
    image = challenge_image(image, is_3d, where)
    spatial = image.shape if is_3d else image.shape[:2]
    if labels.shape != tuple(spatial):
        raise LabelMapError(f"{where}: gts shape {labels.shape} does not match the image's "
                            f"spatial shape {tuple(spatial)}")
    if "boxes" in arrays:
        validate_boxes(arrays["boxes"], spatial, f"{where} (stored boxes)")
    _check_content(image, labels, where)
    return TrainingCase(name, modality_from_name(name), is_3d, image, labels)


def _read_nifti_case(source: CaseSource) -> TrainingCase:
    where = str(source.image_path)
    if source.label_path is None:
        raise MissingLabelsError(f"{where}: no label volume of the same name in labelsTr/ "
                                 "or labels/")
    sidecar_file = source.image_path.with_name(source.case_id + ".json")
    sidecar = read_sidecar(sidecar_file, require_boxes=False) if sidecar_file.is_file() else None
    modality = (sidecar and sidecar.modality) or source.modality
    ct_window = (sidecar and sidecar.ct_window) or source.ct_window

    nifti = load_nifti(source.image_path)
    volume = scalar_volume(nifti.data, where)
    label_file = load_nifti(source.label_path)
    label_volume = three_axes(label_file.data, str(source.label_path))
    if label_volume.shape != volume.shape:
        raise LabelMapError(f"{source.label_path}: label volume shape {label_volume.shape} "
                            f"differs from the image's {volume.shape}")
    if not np.allclose(label_file.affine, nifti.affine, atol=1e-3):
        raise LabelMapError(f"{source.label_path}: the label volume's affine differs from the "
                            "image's: they do not lie on the same voxel grid")

    image, _ = model_volume(volume, nifti.affine, modality, ct_window)
    labels_dhw, _ = volume_to_dhw(label_volume, nifti.affine)
    labels = np.ascontiguousarray(integer_labels(labels_dhw, f"{source.label_path}"))
    _check_content(image, labels, where)
    return TrainingCase(source.case_id, modality or "unknown", True, image, labels)


def read_training_case(source: CaseSource) -> TrainingCase:
    """Read and validate one case; raises a CaseError subclass naming the file on any problem."""
    if not source.image_path.is_file():
        raise CaseReadError(f"{source.image_path}: no such file")
    if source.kind == "npz":
        return _read_npz_case(source)
    return _read_nifti_case(source)
