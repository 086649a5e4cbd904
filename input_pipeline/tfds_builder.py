"""A tensorflow-datasets builder: a folder of cases -> 2D training examples, split by case.

Reading the result needs no TensorFlow: the files are ``array_record`` and every feature is a
``Tensor`` / ``Scalar`` / ``Text`` (an ``Image`` feature or tfrecord files would need
TensorFlow). Read with ``tfds.builder_from_directory(dataset_dir).as_data_source(split)``
(random access) or through :mod:`input_pipeline.loader`.

Record features, one record per slice (S = ``image_size``, 256 by default):

=============== ================ ==========================================================
image           (S, S, 3) uint8  the slice resized (longest side S, INTER_AREA), zero-padded
                                 (raw bytes on disk)
image_hw        (2,) int32       its valid (newh, neww); see ``examples.student_image``
labels          (S, S) uint16    its label map, nearest-neighbour resized, zero-padded
                                 (zlib-compressed on disk); every nonzero value is an object
num_objects     int32            how many objects ``labels`` holds
slice_index     int32            axial slice index in the case (0 for 2D cases)
case_id         text             the case's file name without extension
modality        text             from the name (``3DBox_CT_x`` -> ``CT``) or NIfTI metadata
=============== ================ ==========================================================

The loader turns a record into a training example by choosing one object (``mask = labels ==
k`` and its tight box): one drawn per slice per epoch by default, or every object once.

Records are stored in a fixed order (cases sorted by id, then slices): shuffling happens at read
time (grain), and a fixed order lets the loader and the teacher cache find every record's case,
slice and objects without reading the images (``records-<split>.npz``, written next to the
dataset).

Building runs in two stages, so that it is resumable and a bad case is never fatal:

1. Per case (the expensive part: reading, resizing): the case's examples are written to
   ``WORK_DIR/cases/<case_id>.npz`` atomically (temporary file + rename), keyed by a fingerprint
   of its files and options. An interrupted build resumes with the first case not yet written;
   a case that raises a :class:`~rep_medsam_jax.io.CaseError` (or anything else) is reported and
   skipped. Progress is logged one line per case.
2. tfds writes the splits from those per-case files (cheap), streamed in order into
   array_record shards with flat memory and no TensorFlow (:mod:`input_pipeline.record_writer`).
   An interruption here redoes only this stage (tfds writes into a temporary ``incomplete.*``
   folder renamed at the end).

Both stages run in this process by default; stage 1, and on a cluster stage 2 too, can run as
Apache Beam pipelines over worker processes or a cluster (``build_dataset(...,
beam=BeamSettings(...))``, :mod:`input_pipeline.beam_build`), with the same work files, reports
and records.

Splits are by case: a seeded hash ranks the cases and the first ``round(fraction * n)`` (at least
one when n >= 2 and fraction > 0) go to ``validation``, so no case has slices in both splits,
and adding a case does not move the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from input_pipeline.examples import CaseSlices, make_case_slices
from input_pipeline.record_writer import streaming_writer
from input_pipeline.sources import CaseSource, discover_sources, read_training_case
from rep_medsam_jax.io import CaseError, atomic_write, write_text_atomic
from rep_medsam_jax.io.storage import as_path

DATASET_NAME = "med_sam_slices"
CACHE_FORMAT = 2
SPLITS = ("train", "validation")
_LOG = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The dataset cannot be built at all (no usable case, or options clash with a build)."""


class PipelineBuild(Protocol):
    """How to run both stages as pipelines (``input_pipeline.beam_build.BeamSettings``; Beam
    is optional, so this module does not import it)."""

    writes_records: bool       # stage 2 as a pipeline too (else tfds' in-process writer)

    def pipeline_options(self) -> Any:
        """The pipeline options tfds' writer runs stage 2 with."""

    def prepare_cases(self, sources: list[CaseSource], work_dir: Path, options: BuildOptions, *,
                      on_case_done: Callable[[CaseReport], None] | None,
                      log: Callable[[str], None]) -> list[CaseReport]:
        """Stage 1 of every source; the reports in source order."""

    def records_transform(self, work_dir: Path, case_ids: list[str],
                          first_records: list[int]) -> Any:
        """Stage 2 of one split: a transform giving (record number, record) pairs."""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Everything that changes the built dataset's content.

    image_size: S, the square example size (256 for the model; smaller for quick tests).
    validation_fraction / split_seed: the split by case.
    min_mask_pixels: objects smaller than this at S x S are dropped.
    default_modality / ct_window: NIfTI intensity rule when no metadata names one.
    """

    image_size: int = 256
    validation_fraction: float = 0.1
    split_seed: int = 0
    min_mask_pixels: int = 1
    default_modality: str | None = None
    ct_window: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ct_window"] = list(self.ct_window) if self.ct_window else None
        return data


@dataclasses.dataclass
class CaseReport:
    """What happened to one case. status: "built", "reused" (from the per-case cache), "skipped"."""

    case_id: str
    source: str
    status: str
    slices: int = 0
    objects: int = 0
    error_type: str | None = None
    message: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "skipped"


@dataclasses.dataclass
class BuildResult:
    """dataset_dir: the tfds version folder; split_sizes: records (slices) per split;
    object_counts: objects per split."""

    dataset_dir: Path
    reports: list[CaseReport]
    split_sizes: dict[str, int]
    object_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    reused_existing: bool = False

    @property
    def skipped(self) -> list[CaseReport]:
        return [r for r in self.reports if not r.ok]


# --------------------------------------------------------------------------------------------
# Stage 1: per-case examples, cached
# --------------------------------------------------------------------------------------------

def _case_fingerprint(source: CaseSource, options: BuildOptions) -> str:
    content = {"format": CACHE_FORMAT, "source": source.fingerprint(),
               "image_size": options.image_size, "min_mask_pixels": options.min_mask_pixels}
    return json.dumps(content, sort_keys=True, default=str)


def save_case_slices(path: Path, slices: CaseSlices, fingerprint: str) -> None:
    """Write one case's slices atomically (no half-written file survives a kill)."""
    meta = {"fingerprint": fingerprint, "case_id": slices.case_id,
            "modality": slices.modality, "notes": slices.notes}
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, meta=np.array(json.dumps(meta)), images=slices.images,
                            image_hw=slices.image_hw, slice_index=slices.slice_index,
                            label_maps=slices.label_maps, object_slice=slices.object_slice,
                            object_label=slices.object_label)


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return json.loads(str(archive["meta"]))
    except Exception:       # unreadable cache entry: rebuild the case
        return None


def load_case_slices(path: Path) -> CaseSlices:
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        return CaseSlices(case_id=meta["case_id"], modality=meta["modality"],
                          images=archive["images"], image_hw=archive["image_hw"],
                          slice_index=archive["slice_index"], label_maps=archive["label_maps"],
                          object_slice=archive["object_slice"],
                          object_label=archive["object_label"], notes=meta["notes"])


def prepare_case(source: CaseSource, cases_dir: Path, options: BuildOptions) -> CaseReport:
    """Stage 1 for one case: reuse its work file when the fingerprint matches, else build it.

    Never raises for a bad case (the report says why it was skipped); safe to run for
    different cases in parallel processes (each writes only its own file, atomically).
    """
    start = time.perf_counter()
    path = cases_dir / f"{source.case_id}.npz"
    fingerprint = _case_fingerprint(source, options)
    meta = _read_meta(path) if path.is_file() else None
    if meta is not None and meta["fingerprint"] == fingerprint:
        with np.load(path, allow_pickle=False) as archive:
            report = CaseReport(source.case_id, str(source.image_path), "reused",
                                slices=int(archive["slice_index"].shape[0]),
                                objects=int(archive["object_label"].shape[0]),
                                notes=meta["notes"])
    else:
        report = _build_case(source, path, fingerprint, options)
    report.seconds = time.perf_counter() - start
    return report


def prepare_cases(sources: list[CaseSource], work_dir: Path, options: BuildOptions, *,
                  on_case_done: Callable[[CaseReport], None] | None = None,
                  log: Callable[[str], None] = _LOG.info) -> list[CaseReport]:
    """Stage 1 for every source, one after the other in this process (see the module
    docstring); returns one report per case."""
    cases_dir = work_dir / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    for number, source in enumerate(sources, start=1):
        report = prepare_case(source, cases_dir, options)
        reports.append(report)
        log(progress_line(number, len(sources), report))
        if on_case_done is not None:
            on_case_done(report)
    return reports


def _build_case(source: CaseSource, path: Path, fingerprint: str,
                options: BuildOptions) -> CaseReport:
    def skipped(error_type: str, message: str) -> CaseReport:
        path.unlink(missing_ok=True)         # a stale cache entry must not be used
        return CaseReport(source.case_id, str(source.image_path), "skipped",
                          error_type=error_type, message=message)

    try:
        case = read_training_case(source)
        slices = make_case_slices(case, options.image_size, options.min_mask_pixels)
    except CaseError as err:
        return skipped(type(err).__name__, str(err))
    except Exception as err:        # never lose a long build to one odd file; say what it was
        _LOG.debug("unexpected error in %s:\n%s", source.image_path, traceback.format_exc())
        return skipped(type(err).__name__, f"{source.image_path}: unexpected error: {err}")
    if slices.num_objects == 0:
        return skipped("NoExamplesError", f"{source.image_path}: no object survived the resize "
                       f"to {options.image_size}x{options.image_size}; "
                       + "; ".join(slices.notes))
    save_case_slices(path, slices, fingerprint)
    return CaseReport(source.case_id, str(source.image_path), "built",
                      slices=slices.num_slices, objects=slices.num_objects, notes=slices.notes)


def progress_line(number: int, total: int, report: CaseReport) -> str:
    head = f"[{number}/{total}] {report.case_id}: "
    if not report.ok:
        return head + f"SKIPPED ({report.error_type}) {report.message}"
    notes = f"; {'; '.join(report.notes)}" if report.notes else ""
    return (head + f"{report.status}, {report.slices} slice(s), {report.objects} object(s) "
            f"({report.seconds:.2f} s){notes}")


# --------------------------------------------------------------------------------------------
# Splits by case
# --------------------------------------------------------------------------------------------

def assign_splits(case_ids: list[str], validation_fraction: float,
                  seed: int) -> dict[str, list[str]]:
    """{"train": [...], "validation": [...]}, each sorted; disjoint by construction."""
    ranked = sorted(case_ids,
                    key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    count = len(ranked)
    n_val = 0
    if validation_fraction > 0 and count >= 2:
        n_val = min(count - 1, max(1, round(validation_fraction * count)))
    return {"train": sorted(ranked[n_val:]), "validation": sorted(ranked[:n_val])}


# --------------------------------------------------------------------------------------------
# Stage 2: the tfds builder
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class MedSamSlicesConfig(tfds.core.BuilderConfig):
    """One config per example size (the size is part of the data, hence of the path)."""

    image_size: int = 256


def config_for_size(image_size: int) -> MedSamSlicesConfig:
    return MedSamSlicesConfig(name=f"size{image_size}", image_size=image_size,
                              description=f"{image_size}x{image_size} examples")


class MedSamSlices(tfds.core.GeneratorBasedBuilder):
    """Per-slice training records (image + label map) from challenge npz and NIfTI cases.

    The case folder is the tfds "manual dir" (``DownloadConfig(manual_dir=...)``); prefer
    :func:`build_dataset`, which also writes the record index and the build report.
    """

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Per-slice, per-object examples, split by case.",
                     "2.0.0": "One record per slice with its label map, split by case."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the folder of cases as manual_dir: challenge .npz files at any depth (ground "
        "truth inside or in a gts/ folder beside them) and/or NIfTI pairs (imagesTr + "
        "labelsTr folders at any depth). See input_pipeline/sources.py.")
    BUILDER_CONFIGS = [config_for_size(256)]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds finds this through importlib.resources of the top package, which fails when the
        # package is seen as a namespace package (an editable install made before it had an
        # __init__.py); the answer is simply this file.
        return epath.Path(__file__)

    def __init__(self, *, options: BuildOptions | None = None, work_dir: str | Path | None = None,
                 on_case_done: Callable[[CaseReport], None] | None = None,
                 log: Callable[[str], None] = _LOG.info,
                 source_dirs: Sequence[str | Path] | None = None,
                 beam: PipelineBuild | None = None, **kwargs: Any):
        """source_dirs: the roots of the cases (default: the tfds manual dir alone).
        beam: run stage 1 (and stage 2 when ``beam.writes_records``) as Beam pipelines
        (:mod:`input_pipeline.beam_build`); None builds in this process."""
        self.options = options or BuildOptions()
        self.source_dirs = [Path(d) for d in source_dirs] if source_dirs else None
        self.beam = beam
        config = config_for_size(self.options.image_size)
        known = {c.name for c in self.BUILDER_CONFIGS}     # tfds wants those by name
        kwargs.setdefault("config", config.name if config.name in known else config)
        self._on_case_done = on_case_done
        self._log = log
        self.reports: list[CaseReport] = []
        self.record_index: dict[str, dict[str, list]] = {}
        self.expected_records: dict[str, int] = {}
        super().__init__(**kwargs)
        # Default: DATA_DIR/med_sam_slices_work/size256 (data_dir is DATA_DIR/name/config/version).
        self.work_dir = (Path(work_dir) if work_dir else Path(self.data_dir).parent.parent.parent
                         / f"{DATASET_NAME}_work" / self.builder_config.name)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        tensor, scalar = tfds.features.Tensor, tfds.features.Scalar
        return tfds.core.DatasetInfo(
            builder=self,
            description="Rep-MedSAM training slices: one slice and its label map per record.",
            features=tfds.features.FeaturesDict({
                # Raw bytes: without an encoding tfds stores a uint8 tensor as one int64 per
                # value (1.5x the bytes, ~25x slower to write and ~45x slower to read).
                "image": tensor(shape=(size, size, 3), dtype=np.uint8,
                                encoding=tfds.features.Encoding.BYTES),
                "image_hw": tensor(shape=(2,), dtype=np.int32),
                "labels": tensor(shape=(size, size), dtype=np.uint16,
                                 encoding=tfds.features.Encoding.ZLIB),
                "num_objects": scalar(dtype=np.int32),
                "slice_index": scalar(dtype=np.int32),
                "case_id": tfds.features.Text(),
                "modality": tfds.features.Text(),
            }),
            disable_shuffling=True,      # a fixed record order: see the module docstring
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        options = self.options
        roots = self.source_dirs or [Path(dl_manager.manual_dir)]
        where = ", ".join(str(r) for r in roots)
        sources = discover_sources(roots, default_modality=options.default_modality,
                                   ct_window=options.ct_window)
        if not sources:
            raise BuildError(f"no case found in {where} (see input_pipeline/sources.py for the "
                             "layouts read)")
        self._log(f"{len(sources)} case(s) in {where}; per-case work in {self.work_dir}")
        if self.beam is None:
            self.reports = prepare_cases(sources, self.work_dir, options,
                                         on_case_done=self._on_case_done, log=self._log)
        else:
            self.reports = self.beam.prepare_cases(sources, self.work_dir, options,
                                                   on_case_done=self._on_case_done,
                                                   log=self._log)
        built = [r.case_id for r in self.reports if r.ok]
        if not built:
            raise BuildError(f"none of the {len(sources)} case(s) in {where} could be used; "
                             "every one was skipped (see the log)")
        splits = {split: cases for split, cases in assign_splits(
            built, options.validation_fraction, options.split_seed).items() if cases}
        if self.beam is None or not self.beam.writes_records:
            # The streaming writer (input_pipeline.record_writer) places shard boundaries
            # from each split's record count, known here from the work files' indexes.
            for split, cases in splits.items():
                self.expected_records[split] = len(index_split(self.work_dir, cases)[0]["case"])
            return {split: self._generate_examples(split, cases)
                    for split, cases in splits.items()}
        transforms = {}
        for split, cases in splits.items():
            self.record_index[split], firsts = index_split(self.work_dir, cases)
            transforms[split] = self.beam.records_transform(self.work_dir, cases, firsts)
        return transforms

    def _generate_examples(self, split: str, case_ids: list[str]
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        index = self.record_index[split] = new_record_index(case_ids)
        for case_number, case_id in enumerate(case_ids):
            slices = load_case_slices(self.work_dir / "cases" / f"{case_id}.npz")
            yield from case_records(slices, case_number, index)


# --------------------------------------------------------------------------------------------
# Record index and the whole build
# --------------------------------------------------------------------------------------------

def records_path(dataset_dir: str | Path, split: str) -> Path:
    return as_path(dataset_dir) / f"records-{split}.npz"


def new_record_index(case_ids: list[str]) -> dict[str, list]:
    """An empty record index of a split made of ``case_ids`` (in storage order)."""
    return {"case_ids": list(case_ids), "case_modality": [], "case": [], "slice_index": [],
            "object_record": [], "object_label": []}


def add_case_to_index(index: dict[str, list], case_number: int, modality: str,
                      slice_index: np.ndarray, object_slice: np.ndarray,
                      object_label: np.ndarray) -> int:
    """Append one case's records (one per slice, in order) to ``index``; returns the number
    of its first record."""
    first = len(index["case"])
    index["case_modality"].append(modality)
    index["case"].extend([case_number] * len(slice_index))
    index["slice_index"].extend(int(z) for z in slice_index)
    order = np.argsort(object_slice, kind="stable")    # objects by record, labels as stored
    index["object_record"].extend(first + int(row) for row in object_slice[order])
    index["object_label"].extend(int(v) for v in object_label[order])
    return first


def slice_record(slices: CaseSlices, row: int) -> dict[str, Any]:
    """The record of row ``row`` of a case's slices (see the module docstring)."""
    return {
        "image": slices.images[row],
        "image_hw": slices.image_hw[row],
        "labels": slices.label_maps[row],
        "num_objects": int(np.count_nonzero(slices.object_slice == row)),
        "slice_index": int(slices.slice_index[row]),
        "case_id": slices.case_id,
        "modality": slices.modality,
    }


def case_records(slices: CaseSlices, case_number: int, index: dict[str, list]
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (key, record) pairs of one case in storage order; the case is added to ``index``."""
    add_case_to_index(index, case_number, slices.modality, slices.slice_index,
                      slices.object_slice, slices.object_label)
    for row in range(slices.num_slices):
        yield f"{slices.case_id}/{int(slices.slice_index[row]):05d}", slice_record(slices, row)


def load_case_index(path: Path) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(modality, slice_index, object_slice, object_label) of a work file, without reading
    its images or label maps (npz members are read one by one)."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        return (meta["modality"], archive["slice_index"], archive["object_slice"],
                archive["object_label"])


def index_split(work_dir: Path, case_ids: list[str]) -> tuple[dict[str, list], list[int]]:
    """The record index of a split from the work files alone, and each case's first record."""
    index = new_record_index(case_ids)
    firsts = [add_case_to_index(index, number, *load_case_index(
        work_dir / "cases" / f"{case_id}.npz")) for number, case_id in enumerate(case_ids)]
    return index, firsts


def write_record_index(dataset_dir: Path, split: str, index: dict[str, list]) -> None:
    """``records-<split>.npz``: per record (in storage order) its case number and slice; per
    case its id and modality; per object (records in order, labels ascending) its record and
    label value."""
    with atomic_write(records_path(dataset_dir, split)) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, case_ids=np.array(index["case_ids"], dtype=str),
                 case_modality=np.array(index["case_modality"], dtype=str),
                 case=np.asarray(index["case"], np.int32),
                 slice_index=np.asarray(index["slice_index"], np.int32),
                 object_record=np.asarray(index["object_record"], np.int64),
                 object_label=np.asarray(index["object_label"], np.int32))


def read_record_index(dataset_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """The arrays of :func:`write_record_index` (``case_ids``, ``case_modality``, ``case``,
    ``slice_index``, ``object_record``, ``object_label``)."""
    with records_path(dataset_dir, split).open("rb") as handle, \
            np.load(handle, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _remove_stale_incomplete_dirs(version_dir: Path) -> None:
    """A killed tfds run leaves ``incomplete.XXXXXX_<version>`` beside the version folder."""
    parent = version_dir.parent
    if parent.is_dir():
        for stale in parent.glob(f"incomplete.*_{version_dir.name}"):
            shutil.rmtree(stale, ignore_errors=True)


def _remove_stale_temporaries(work_dir: Path) -> None:
    """A killed build leaves the work files it was writing as hidden temporaries
    (``.tmp-<random>-<case>.npz``, never read as work files); remove them."""
    for folder in (work_dir / "cases", work_dir / "reports"):
        if folder.is_dir():
            for stale in folder.glob(".tmp-*"):
                stale.unlink(missing_ok=True)


def read_finished_build(dataset_dir: str | Path, options: BuildOptions,
                        log: Callable[[str], None] = _LOG.info) -> BuildResult:
    """The BuildResult of the finished build in ``dataset_dir`` (a local folder or a URL, with
    its ``build_params.json``); BuildError if it was built with other ``options``."""
    dataset_dir = as_path(dataset_dir)
    stored = json.loads((dataset_dir / "build_params.json").read_text())
    if stored.get("options") != options.to_json():
        raise BuildError(f"{dataset_dir} was built with other options "
                         f"({stored.get('options')}); use another data dir or overwrite")
    report = json.loads((dataset_dir / "build_report.json").read_text())
    log(f"dataset already built at {dataset_dir}; reusing it")
    return BuildResult(dataset_dir, [CaseReport(**r) for r in report["cases"]],
                       report["split_sizes"], report.get("object_counts", {}),
                       reused_existing=True)


def build_dataset(source_dir: str | Path | Sequence[str | Path], data_dir: str | Path,
                  options: BuildOptions | None = None, *, work_dir: str | Path | None = None,
                  overwrite: bool = False,
                  on_case_done: Callable[[CaseReport], None] | None = None,
                  log: Callable[[str], None] = _LOG.info,
                  beam: PipelineBuild | None = None,
                  num_shards: int | None = None) -> BuildResult:
    """Build (or resume building) the dataset of the cases under ``source_dir`` (one folder or
    several) in ``data_dir``.

    beam: run the build as Beam pipelines (:mod:`input_pipeline.beam_build`: DirectRunner
    worker processes or a cluster runner; the records are written in this process unless
    ``beam.writes_records``); None (the default) builds in this process. All give the same
    records in the same order. num_shards: array_record files per split (None:
    one per ~1 GiB of serialised records in this process, tfds' sizing on a cluster); the
    record order does not depend on it.

    Returns where it is and what happened to every case; the report is also written to
    ``<dataset_dir>/build_report.json``. An existing dataset built with the same options is
    reused (``overwrite=True`` rebuilds it, still reusing the per-case work); one built with
    other options raises BuildError. For a ``data_dir`` that may be a URL (``gs://...``) see
    ``input_pipeline.remote_build.build_dataset_at``.
    """
    options = options or BuildOptions()
    roots = ([Path(source_dir)] if isinstance(source_dir, (str, Path))
             else [Path(d) for d in source_dir])
    builder = MedSamSlices(options=options, work_dir=work_dir, on_case_done=on_case_done,
                           log=log, source_dirs=roots, beam=beam, data_dir=str(data_dir),
                           file_format="array_record")
    dataset_dir = Path(builder.data_dir)
    params_path = dataset_dir / "build_params.json"
    # build_params.json is written last: without it a prepared tfds dataset is incomplete.
    complete = builder.is_prepared() and params_path.is_file()
    if complete and not overwrite:
        return read_finished_build(dataset_dir, options, log)

    _remove_stale_incomplete_dirs(dataset_dir)
    _remove_stale_temporaries(builder.work_dir)
    modes = tfds.download.GenerateMode
    mode = (modes.REUSE_CACHE_IF_EXISTS if overwrite or builder.is_prepared()
            else modes.REUSE_DATASET_IF_EXISTS)
    records_on_cluster = beam is not None and beam.writes_records
    with (contextlib.nullcontext() if records_on_cluster
          else streaming_writer(builder.expected_records)):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=str(roots[0]), download_mode=mode, try_download_gcs=False,
            num_shards=num_shards,
            beam_options=beam.pipeline_options() if records_on_cluster else None))

    split_sizes, object_counts = {}, {}
    for split, index in builder.record_index.items():
        write_record_index(dataset_dir, split, index)
        split_sizes[split] = len(index["case"])
        object_counts[split] = len(index["object_label"])
    document = {"split_sizes": split_sizes, "object_counts": object_counts,
                "cases": [dataclasses.asdict(r) for r in builder.reports]}
    write_text_atomic(dataset_dir / "build_report.json", json.dumps(document, indent=1))
    write_text_atomic(params_path, json.dumps({"options": options.to_json(),
                                               "splits": {s: i["case_ids"] for s, i in
                                                          builder.record_index.items()}},
                                              indent=1))
    skipped = [r for r in builder.reports if not r.ok]
    log(f"built {dataset_dir}: " + ", ".join(f"{s} {n} slices ({object_counts[s]} objects)"
                                             for s, n in split_sizes.items())
        + f"; {len(skipped)} case(s) skipped" + "".join(
            f"\n  skipped {r.case_id}: {r.error_type}: {r.message}" for r in skipped))
    return BuildResult(dataset_dir, builder.reports, split_sizes, object_counts)


def open_split(dataset_dir: str | Path, split: str):
    """Random-access tfds data source of one split (no TensorFlow needed)."""
    return tfds.builder_from_directory(str(dataset_dir)).as_data_source(split)
