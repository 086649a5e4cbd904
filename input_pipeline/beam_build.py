"""The dataset build as Apache Beam pipelines: local worker processes or a cluster.

Only imported when a runner is asked for (``build_dataset(..., beam=BeamSettings(...))``,
``python -m input_pipeline.build --runner ...``); the in-process build needs no Beam.

Two pipelines, the same two stages as the in-process build (:mod:`input_pipeline.tfds_builder`):

1. **Per case** (:func:`prepare_cases_with_beam`): the cases are spread over the workers; each
   runs :func:`~input_pipeline.tfds_builder.prepare_case` (reuse the work file
   ``WORK_DIR/cases/<case>.npz`` when its fingerprint matches, else read, resize and write it
   atomically) and writes its report to ``WORK_DIR/reports/<case>.json``, logs one progress
   line and counts it (Beam counters ``med_sam_slices/cases_built`` etc.). The launcher then
   gathers the reports: every skipped case is known by name, whichever worker saw it.
   A killed pipeline loses only the cases in flight; the rerun reuses every finished work file.
2. **Records** (:func:`records_transform`): the launcher splits the usable cases by case and
   numbers their records from the work files alone (``records-<split>.npz``); the workers read
   the work files and emit ``(record number, record)``; tfds' Beam writer sorts by that integer
   key and writes ``array_record`` shards in exactly that order. On cluster runners only by
   default (``BeamSettings.records_on_beam``): the DirectRunner keeps grouped data in the
   launcher's memory, so a local build writes the records in the launcher, streaming, as the
   in-process build does.

Stage 1 must finish before stage 2 starts (the split and the record numbers depend on which
cases could be used), hence two pipelines rather than one.

Workers must see WORK_DIR and the data dir at the same paths as the launcher (one machine, or
a shared file system on a cluster).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from input_pipeline.sources import CaseSource
from input_pipeline.tfds_builder import (BuildError, BuildOptions, CaseReport, load_case_slices,
                                         prepare_case, progress_line, slice_record)
from rep_medsam_jax.io import write_text_atomic

RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "spark": "SparkRunner",
           "flink": "FlinkRunner"}
COUNTER_NAMESPACE = "med_sam_slices"
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BeamSettings:
    """Which Beam runner builds the dataset, and how.

    runner: a key of RUNNERS. workers: DirectRunner worker processes (``--direct_num_workers``
    with ``--direct_running_mode multi_processing``); other runners size their pools through
    their own options.
    options: further Beam pipeline options as ``key=value`` (or a bare ``flag``), e.g.
    ``project=my-project``, ``temp_location=gs://bucket/tmp``.
    records_on_beam: write the records (stage 2) with a Beam pipeline too. None: on cluster
    runners only. The DirectRunner holds every grouped element in the launcher's memory, and
    stage 2 groups the whole dataset by shard (tens of GB at the challenge's size), so a local
    build writes its records in the launcher with tfds' streaming writer instead.
    """

    runner: str = "direct"
    workers: int = 1
    options: tuple[str, ...] = ()
    records_on_beam: bool | None = None

    @property
    def writes_records(self) -> bool:
        """Whether stage 2 runs as a Beam pipeline (see ``records_on_beam``)."""
        if self.records_on_beam is None:
            return self.runner != "direct"
        return self.records_on_beam

    def pipeline_args(self) -> list[str]:
        if self.runner not in RUNNERS:
            raise ValueError(f"unknown Beam runner {self.runner!r}; one of {sorted(RUNNERS)}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.workers != 1 and self.runner != "direct":
            raise ValueError(f"workers is for the direct runner; size a {self.runner} job with "
                             "its own options (e.g. num_workers=N, max_num_workers=N)")
        args = [f"--runner={RUNNERS[self.runner]}"]
        if self.runner == "direct":
            mode = "multi_processing" if self.workers > 1 else "in_memory"
            args += [f"--direct_num_workers={self.workers}", f"--direct_running_mode={mode}"]
        given = {option.partition("=")[0] for option in self.options}
        # Worker logs: the per-case progress lines, not the harness' own chatter.
        if "default_sdk_harness_log_level" not in given:
            args.append("--default_sdk_harness_log_level=WARNING")
        if "sdk_harness_log_level_overrides" not in given:
            args.append('--sdk_harness_log_level_overrides={"input_pipeline": "INFO"}')
        for option in self.options:
            key, sep, value = option.partition("=")
            if not key or key.startswith("-"):
                raise ValueError(f"Beam option {option!r}: expected key=value or a flag name")
            args.append(f"--{key}={value}" if sep else f"--{key}")
        return args

    def pipeline_options(self) -> PipelineOptions:
        return PipelineOptions(self.pipeline_args())

    # The PipelineBuild protocol of input_pipeline.tfds_builder:
    def prepare_cases(self, sources: list[CaseSource], work_dir: Path, options: BuildOptions, *,
                      on_case_done: Callable[[CaseReport], None] | None = None,
                      log: Callable[[str], None] = _LOG.info) -> list[CaseReport]:
        return prepare_cases_with_beam(sources, work_dir, options, self,
                                       on_case_done=on_case_done, log=log)

    def records_transform(self, work_dir: Path, case_ids: Sequence[str],
                          first_records: Sequence[int]) -> beam.PTransform:
        return records_transform(work_dir, case_ids, first_records)


def report_path(work_dir: Path, case_id: str) -> Path:
    return work_dir / "reports" / f"{case_id}.json"


def sources_path(work_dir: Path) -> Path:
    return work_dir / "sources.json"


def write_sources(work_dir: Path, sources: list[CaseSource]) -> None:
    """The case list, for the workers. A file rather than the pipeline's own data: tens of
    thousands of cases would bloat the job description past what a cluster accepts."""
    rows = [dataclasses.asdict(s) | {"image_path": str(s.image_path),
                                     "label_path": s.label_path and str(s.label_path),
                                     "ct_window": s.ct_window and list(s.ct_window)}
            for s in sources]
    write_text_atomic(sources_path(work_dir), json.dumps(rows))


def read_sources(work_dir: Path) -> list[CaseSource]:
    rows = json.loads(sources_path(work_dir).read_text())
    return [CaseSource(**row | {"image_path": Path(row["image_path"]),
                                "label_path": row["label_path"] and Path(row["label_path"]),
                                "ct_window": row["ct_window"] and tuple(row["ct_window"])})
            for row in rows]


class _PrepareCase(beam.DoFn):
    """Stage 1 of case number k (1-based) of ``WORK_DIR/sources.json`` on a worker: work file,
    report file, progress line, counters."""

    def __init__(self, work_dir: Path, options: BuildOptions,
                 on_case_done: Callable[[CaseReport], None] | None):
        self.work_dir, self.options = work_dir, options
        self.on_case_done = on_case_done
        self.sources: list[CaseSource] = []

    def setup(self):
        self.sources = read_sources(self.work_dir)

    def process(self, number: int):
        source = self.sources[number - 1]
        report = prepare_case(source, self.work_dir / "cases", self.options)
        write_text_atomic(report_path(self.work_dir, source.case_id),
                          json.dumps(dataclasses.asdict(report)))
        # Logged in the worker; DirectRunner forwards worker logs to the launcher's stderr,
        # cluster runners to their log viewers.
        _LOG.info(progress_line(number, len(self.sources), report))
        beam.metrics.Metrics.counter(COUNTER_NAMESPACE, f"cases_{report.status}").inc()
        beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "slices").inc(report.slices)
        if self.on_case_done is not None:
            self.on_case_done(report)
        yield source.case_id


def prepare_cases_with_beam(sources: list[CaseSource], work_dir: Path, options: BuildOptions,
                            settings: BeamSettings, *,
                            on_case_done: Callable[[CaseReport], None] | None = None,
                            log: Callable[[str], None] = _LOG.info) -> list[CaseReport]:
    """Stage 1 of every source as one Beam pipeline; returns the reports in source order.

    ``on_case_done`` runs on the worker that finished the case (it must pickle); an exception
    from it fails the pipeline like a crash would, leaving the finished work files.
    """
    (work_dir / "cases").mkdir(parents=True, exist_ok=True)
    (work_dir / "reports").mkdir(parents=True, exist_ok=True)
    write_sources(work_dir, sources)
    log(f"stage 1 on Beam {RUNNERS[settings.runner]} ({settings.workers} worker(s)): "
        f"{len(sources)} case(s)")
    with beam.Pipeline(options=settings.pipeline_options()) as pipeline:
        _ = (pipeline
             | "Cases" >> beam.Create(range(1, len(sources) + 1))
             | "Spread" >> beam.Reshuffle()
             | "PrepareCase" >> beam.ParDo(_PrepareCase(work_dir, options, on_case_done)))
    reports = []
    for source in sources:
        path = report_path(work_dir, source.case_id)
        if not path.is_file():
            raise BuildError(f"stage 1 finished without a report for {source.case_id} "
                             f"({path}); rerun the build")
        reports.append(CaseReport(**json.loads(path.read_text())))
    counts = {status: sum(r.status == status for r in reports)
              for status in ("built", "reused", "skipped")}
    log(f"stage 1 done: {counts['built']} built, {counts['reused']} reused, "
        f"{counts['skipped']} skipped, {sum(r.slices for r in reports)} slice(s)")
    return reports


def _emit_case_records(element: tuple[str, int], work_dir: Path):
    case_id, first = element
    slices = load_case_slices(work_dir / "cases" / f"{case_id}.npz")
    for row in range(slices.num_slices):
        yield first + row, slice_record(slices, row)
    beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "records_emitted").inc(slices.num_slices)


def records_transform(work_dir: Path, case_ids: Sequence[str],
                      first_records: Sequence[int]) -> beam.PTransform:
    """Stage 2 of one split: (record number, record) of every case, for tfds' Beam writer."""
    cases = list(zip(case_ids, first_records))

    @beam.ptransform_fn
    def _records(pipeline):
        return (pipeline
                | "Cases" >> beam.Create(cases)
                | "Spread" >> beam.Reshuffle()
                | "Records" >> beam.FlatMap(_emit_case_records, work_dir=work_dir))

    return _records()
