"""Predict a folder of cases: progress bar, per-case error isolation, atomic outputs, summary."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rep_medsam_jax.io import (SUPPORTED_SUFFIXES, CaseError, discover_cases, read_case,
                               write_segmentation)
from rep_medsam_jax.predictor.backend import Backend
from rep_medsam_jax.predictor.cases import predict_2d, predict_3d


@dataclasses.dataclass
class CaseResult:
    name: str
    seconds: float
    output: Path | None = None
    error: str | None = None


@dataclasses.dataclass
class RunSummary:
    results: list[CaseResult]

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.error is not None]

    def report(self) -> str:
        done = [r for r in self.results if r.error is None]
        lines = [f"{len(done)} of {len(self.results)} case(s) segmented"]
        if done:
            times = np.array([r.seconds for r in done])
            lines.append(f"time per case: mean {times.mean():.3f} s, max {times.max():.3f} s")
        for failure in self.failures:
            lines.append(f"FAILED {failure.name}: {failure.error}")
        return "\n".join(lines)


def predict_case(backend: Backend, case) -> np.ndarray:
    """Label map for one read case (2D image or 3D volume)."""
    if case.is_3d:
        return predict_3d(backend, case.image, case.boxes)
    return predict_2d(backend, case.image, case.boxes)


def case_paths(input_path: str | Path) -> list[Path]:
    """The cases to run: every case in a folder (:func:`discover_cases`), or one case file.

    Raises FileNotFoundError when the path does not exist or holds no case, ValueError for a
    file of an unsupported type, before any model is loaded.
    """
    path = Path(input_path)
    if path.is_file():
        if not path.name.lower().endswith(SUPPORTED_SUFFIXES):
            raise ValueError(f"{path}: unsupported file type; expected a folder of cases or "
                             f"one of {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    paths = discover_cases(path)
    if not paths:
        raise FileNotFoundError(f"{path}: no cases (.npz, .nii, .nii.gz, .png, .jpg, "
                                ".dcm files or DICOM series folders)")
    return paths


def predict_folder(backend: Backend, input_dir: str | Path, output_dir: str | Path,
                   overlay_dir: str | Path | None = None,
                   boxes_override: Sequence[Sequence[float]] | None = None,
                   modality: str | None = None, ct_window: tuple[float, float] | None = None,
                   show_progress: bool = True) -> RunSummary:
    """Segment every case in ``input_dir`` (or the one case file it names) into
    ``output_dir`` (same names).

    A bad case (unreadable, missing key or boxes, box outside the image, NaN pixels...) is
    reported and skipped; the others still run. Outputs are written atomically.
    boxes_override / modality / ct_window: passed to :func:`read_case` for every case (they
    override stored boxes, sidecars and DICOM tags).
    """
    from tqdm import tqdm  # noqa: PLC0415

    paths = case_paths(input_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    bar = tqdm(paths, desc="cases", unit="case", disable=not show_progress, file=sys.stderr)
    for path in bar:
        start = time.perf_counter()
        try:
            case = read_case(path, boxes_override=boxes_override, modality=modality,
                             ct_window=ct_window)
            for note in case.notes:
                bar.write(f"note {path.name}: {note}")
            segs = predict_case(backend, case)
            output = write_segmentation(case, segs, output_dir)
            if overlay_dir is not None:
                from rep_medsam_jax.predictor.overlay import write_overlay  # noqa: PLC0415

                write_overlay(case, segs, overlay_dir)
            results.append(CaseResult(path.name, time.perf_counter() - start, output))
        except Exception as err:  # noqa: BLE001  (one bad case must not stop the run)
            message = str(err) if isinstance(err, CaseError) else f"{type(err).__name__}: {err}"
            results.append(CaseResult(path.name, time.perf_counter() - start, error=message))
            bar.write(f"skipped {path.name}: {message}")
    return RunSummary(results)
