"""Several built datasets mixed with per-source fractions and modality filters.

Rep-MedSAM distils on all challenge data except CT plus a uniform 20 % of the challenge's CT,
and fine-tunes on the challenge data without its CT plus CT from supplementary datasets. As a
mixture::

    challenge = "DATA/challenge/med_sam_slices/size256/2.0.0"
    distill = Mixture((Source(challenge, exclude_modalities=("CT",)),
                       Source(challenge, modalities=("CT",), fraction=0.2)), seed=0)
    finetune = Mixture((Source(challenge, exclude_modalities=("CT",)),
                        Source("DATA/extra_ct/med_sam_slices/size256/2.0.0")))
    loader = make_loader(distill, batch_size=16, ...)        # input_pipeline.loader

The rules (all decided once, from the ``records-<split>.npz`` indexes; no image is read):

* A source is one split of one built dataset. Its candidate slices are the split's records
  (one per slice) whose case modality (``case_modality``) is in ``modalities`` (when given) and
  not in ``exclude_modalities``. A name the split does not hold is an error that lists the ones
  it holds.
* ``fraction`` f > 0 scales the source: every candidate slice appears ``floor(f)`` times, and a
  seeded uniform subset of ``round(frac(f) * n)`` of the n candidates (rounded half up, drawn
  without replacement) once more. So 1 is every slice once, 0.2 a fixed 20 % subset, 2 every
  slice twice, 1.5 every slice once and half of them twice. The subset of source k is drawn
  from ``numpy.random.default_rng([seed, k])``: the same mixture gives the same subset in every
  epoch, process and restart; another seed gives another subset.
* The table lists (source, record, label) rows, source by source, records in storage order. With
  sampling "slice" a row is a slice (label 0: the loader draws one of its objects each time it
  comes up); with "object" each selected slice contributes one row per object (as often as the
  slice is selected). An epoch of the loader is one pass over the table in a seeded order.

``input_pipeline.loader.MixtureSource`` is the grain random-access source over the table: each
source is an ``ExampleSource`` (with the source's teacher cache), and every example carries
``source`` (its number) beside ``index`` (the record in its own split). This module reads only
the record indexes and needs no grain, so the training config checks a mixture before any
compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from input_pipeline.tfds_builder import read_record_index, records_path

SAMPLINGS = ("slice", "object")


class MixtureError(ValueError):
    """A mixture that cannot be built; the message names the source and what is wrong."""


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    # A bare string is one name: tuple("CT") would be ("C", "T").
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


@dataclasses.dataclass(frozen=True)
class Source:
    """One split of one built dataset (``DATA/med_sam_slices/size<S>/<version>``), scaled by
    ``fraction`` and filtered by modality (see the module docstring for the rules).

    teacher_cache_dir: that split's teacher embeddings (``python -m input_pipeline.teacher_cache``)
    for distillation; give one for every source of a mixture or for none.
    """

    dataset_dir: str
    split: str = "train"
    fraction: float = 1.0
    modalities: tuple[str, ...] = ()
    exclude_modalities: tuple[str, ...] = ()
    teacher_cache_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset_dir", str(self.dataset_dir))
        object.__setattr__(self, "modalities", _names(self.modalities))
        object.__setattr__(self, "exclude_modalities", _names(self.exclude_modalities))
        object.__setattr__(self, "teacher_cache_dir",
                           str(self.teacher_cache_dir) if self.teacher_cache_dir else None)
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
                math.isfinite(fraction) and fraction > 0):
            raise MixtureError(f"source {self.dataset_dir} ({self.split}): fraction must be a "
                               f"finite number > 0, got {fraction!r}")
        object.__setattr__(self, "fraction", float(fraction))
        if self.modalities and self.exclude_modalities:
            raise MixtureError(f"source {self.dataset_dir} ({self.split}): give modalities "
                               f"{self.modalities} or exclude_modalities "
                               f"{self.exclude_modalities}, not both")

    def describe(self) -> str:
        """The dataset by name/config/version (not its absolute path), split, fraction, filters."""
        name = "/".join(Path(self.dataset_dir).parts[-3:])
        text = f"{name} {self.split} x{self.fraction!r}"
        if self.modalities:
            text += f" only {','.join(self.modalities)}"
        if self.exclude_modalities:
            text += f" without {','.join(self.exclude_modalities)}"
        return text


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Sources and the seed of their subsets. ``sources`` may be any sequence of :class:`Source`
    (or of dicts with its fields)."""

    sources: tuple[Source, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        sources = tuple(s if isinstance(s, Source) else Source(**s) for s in self.sources)
        if not sources:
            raise MixtureError("a mixture needs at least one source; got none")
        with_cache = [s.teacher_cache_dir is not None for s in sources]
        if any(with_cache) and not all(with_cache):
            missing = [k for k, has in enumerate(with_cache) if not has]
            raise MixtureError(f"teacher caches: sources {missing} have none while others do; "
                               "give every source its teacher_cache_dir, or none")
        object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "seed", int(self.seed))


@dataclasses.dataclass(frozen=True)
class MixtureTable:
    """Rows of a mixture: source (N,) int32, record (N,) int64 (in that source's split), label
    (N,) int32 (the object with sampling "object"; 0 with "slice"). ``fingerprints``: per source
    a digest of its record index (names the data without its path)."""

    source: np.ndarray
    record: np.ndarray
    label: np.ndarray
    fingerprints: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.source.shape[0])

    def rows_per_source(self) -> np.ndarray:
        """(S,) int64: rows of each source."""
        return np.bincount(self.source, minlength=len(self.fingerprints)).astype(np.int64)


def read_indexes(mixture: Mixture) -> list[dict[str, np.ndarray]]:
    """Each source's record index (``records-<split>.npz``); a missing one is a clear error."""
    indexes = []
    for number, source in enumerate(mixture.sources):
        path = records_path(source.dataset_dir, source.split)
        if not path.is_file():
            raise MixtureError(f"source {number} ({source.describe()}): {path} does not exist; "
                               "not a built dataset, or no split named "
                               f"{source.split!r} (python -m input_pipeline.build)")
        indexes.append(read_record_index(source.dataset_dir, source.split))
    return indexes


def slice_counts(source: Source, number: int, seed: int,
                 index: dict[str, np.ndarray]) -> np.ndarray:
    """(R,) int64: how many times each record (slice) of the source's split is in the mixture."""
    record_modality = index["case_modality"][index["case"]].astype(str)
    present = sorted(set(record_modality.tolist()))
    unknown = sorted(set(source.modalities + source.exclude_modalities) - set(present))
    if unknown:
        raise MixtureError(f"source {number} ({source.describe()}): no modality {unknown} in "
                           f"{records_path(source.dataset_dir, source.split)}; its modalities "
                           f"are {present}")
    if source.modalities:
        keep = np.isin(record_modality, source.modalities)
    else:
        keep = ~np.isin(record_modality, source.exclude_modalities)
    candidates = np.flatnonzero(keep)
    whole = math.floor(source.fraction)
    extra = math.floor((source.fraction - whole) * candidates.size + 0.5)
    counts = np.zeros(record_modality.shape[0], np.int64)
    counts[candidates] = whole
    rng = np.random.default_rng([seed, number])
    counts[candidates[rng.choice(candidates.size, size=extra, replace=False)]] += 1
    if not counts.any():
        raise MixtureError(f"source {number} ({source.describe()}) selects no slice: "
                           f"{candidates.size} candidate slices x {source.fraction:g} rounds to "
                           "0")
    return counts


def _fingerprint(index: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(index["case_ids"].astype(str).tolist()).encode())
    for key in ("case", "slice_index", "object_label"):
        digest.update(np.ascontiguousarray(index[key]).tobytes())
    return digest.hexdigest()[:12]


def mixture_table(mixture: Mixture, sampling: str = "slice",
                  indexes: list[dict[str, np.ndarray]] | None = None) -> MixtureTable:
    """The rows of ``mixture`` for ``sampling`` ("slice" or "object"); pure given the record
    indexes (read from the sources when not given)."""
    if sampling not in SAMPLINGS:
        raise MixtureError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    indexes = read_indexes(mixture) if indexes is None else indexes
    sources, records, labels = [], [], []
    for number, (source, index) in enumerate(zip(mixture.sources, indexes)):
        counts = slice_counts(source, number, mixture.seed, index)
        if sampling == "slice":
            record = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
            label = np.zeros(record.size, np.int32)
        else:
            repeats = counts[index["object_record"]]
            record = np.repeat(index["object_record"].astype(np.int64), repeats)
            label = np.repeat(index["object_label"].astype(np.int32), repeats)
        sources.append(np.full(record.size, number, np.int32))
        records.append(record)
        labels.append(label)
    return MixtureTable(np.concatenate(sources), np.concatenate(records),
                        np.concatenate(labels), tuple(_fingerprint(i) for i in indexes))


def describe_table(mixture: Mixture, table: MixtureTable,
                   indexes: list[dict[str, np.ndarray]] | None = None) -> list[str]:
    """One line per source: its description and its rows per modality (for the run's log)."""
    indexes = read_indexes(mixture) if indexes is None else indexes
    lines = []
    for number, (source, index) in enumerate(zip(mixture.sources, indexes)):
        records = table.record[table.source == number]
        modality = index["case_modality"][index["case"][records]].astype(str)
        names, counts = np.unique(modality, return_counts=True)
        shown = ", ".join(f"{n} {c}" for n, c in zip(names.tolist(), counts.tolist()))
        lines.append(f"source {number} {source.describe()}: {records.size} rows ({shown})")
    return lines
