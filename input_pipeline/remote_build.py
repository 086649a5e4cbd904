"""Building the dataset into a local folder or a URL data folder (``gs://bucket/data``):
:func:`build_dataset_at`.

array_record's writer opens local files only (its reader also reads ``gs://`` objects, so
training reads the uploaded dataset in place). So the dataset is built in a local temporary
folder by :func:`input_pipeline.tfds_builder.build_dataset` and its version folder is uploaded,
``build_params.json`` last: as for a local build, a version folder without it is incomplete and
is built again. A finished upload built with the same options is reused; the per-case work is
kept only when ``work_dir`` names a local folder (else it goes with the temporary folder).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from input_pipeline.tfds_builder import (DATASET_NAME, BuildOptions, BuildResult, CaseReport,
                                         MedSamSlices, build_dataset, config_for_size,
                                         read_finished_build)
from rep_medsam_jax.io.storage import as_path, is_url, upload_tree

_LOG = logging.getLogger(__name__)


def dataset_relative_dir(image_size: int) -> str:
    """``med_sam_slices/size<S>/<version>``: where tfds puts the dataset under a data folder."""
    return f"{DATASET_NAME}/{config_for_size(image_size).name}/{MedSamSlices.VERSION}"


def build_dataset_at(source_dir: str | Path | Sequence[str | Path], data_dir: Any,
                     options: BuildOptions | None = None, *,
                     work_dir: str | Path | None = None, overwrite: bool = False,
                     on_case_done: Callable[[CaseReport], None] | None = None,
                     log: Callable[[str], None] = _LOG.info,
                     beam: Any = None, num_shards: int | None = None) -> BuildResult:
    """:func:`~input_pipeline.tfds_builder.build_dataset` where ``data_dir`` may also be a URL
    (see the module docstring; then ``dataset_dir`` of the result is the uploaded folder)."""
    options = options or BuildOptions()
    if not is_url(data_dir):
        return build_dataset(source_dir, data_dir, options, work_dir=work_dir,
                             overwrite=overwrite, on_case_done=on_case_done, log=log,
                             beam=beam, num_shards=num_shards)
    target = as_path(data_dir) / dataset_relative_dir(options.image_size)
    if (target / "build_params.json").is_file() and not overwrite:
        return read_finished_build(target, options, log)

    with tempfile.TemporaryDirectory(prefix="rep-medsam-build-") as staging:
        local = build_dataset(source_dir, Path(staging) / "data", options,
                              work_dir=work_dir or Path(staging) / "work",
                              on_case_done=on_case_done, log=log, beam=beam,
                              num_shards=num_shards)
        if target.exists():          # an older build (overwrite) or an unfinished upload
            target.rmtree()
        uploaded = upload_tree(local.dataset_dir, target, last=["build_params.json"])
        log(f"uploaded {len(uploaded)} file(s) of {local.dataset_dir} to {target}")
    return dataclasses.replace(local, dataset_dir=target)
