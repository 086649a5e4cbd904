"""The dataset build as Apache Beam pipelines (DirectRunner, two worker processes) against the
in-process build of the same cases: same records in the same order, every bad case named,
resumption after a failure in the middle of stage 1 with nothing lost or duplicated.

The in-process build is the reference (tests/test_input_pipeline.py checks it against the raw
case files with OpenCV / NumPy by hand).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

beam_build = pytest.importorskip("input_pipeline.beam_build")

from input_pipeline.tfds_builder import (BuildOptions, build_dataset,  # noqa: E402
                                         load_case_slices, open_split, read_record_index)
from tests.phantom_data import write_nested_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPTIONS = BuildOptions(image_size=32, validation_fraction=0.3)
BAD_CASES = {"CT_corrupt_01": "CaseReadError", "MR_othergrid_02": "LabelMapError"}


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two roots of nested cases, with a corrupt file and a label map on another grid deep in
    the tree; and the in-process build of them (the reference)."""
    root = tmp_path_factory.mktemp("beam")
    first, second = root / "rootA", root / "rootB"
    names = write_nested_corpus(first, root / "flatA", n2d=3, n3d=1, seed=0)
    names += [n.replace("_000", "_100") for n in write_nested_corpus(
        second, root / "flatB", n2d=2, n3d=1, seed=1)]
    for path in sorted(second.rglob("*.npz")):       # the second root's ids must differ
        path.rename(path.with_name(path.name.replace("_000", "_100")))
    corrupt = first / "CT" / "Broken" / "deep" / "CT_corrupt_01.npz"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"PK\x03\x04 not a zip archive")
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    labels = np.zeros((16, 12), np.uint8)          # 16 x 12 labels for a 16 x 16 image
    labels[2:6, 2:6] = 1
    other = second / "MR" / "Odd" / "MR_othergrid_02.npz"
    other.parent.mkdir(parents=True)
    np.savez(other, imgs=image, gts=labels)
    reference = build_dataset([first, second], root / "reference", OPTIONS, log=_quiet)
    return {"roots": [first, second], "names": names, "reference": reference, "root": root}


def _records(dataset_dir: Path) -> dict[str, list[dict]]:
    return {split: [source[i] for i in range(len(source))]
            for split in ("train", "validation")
            for source in [open_split(dataset_dir, split)]}


def _assert_same_dataset(dataset_dir: Path, reference_dir: Path) -> None:
    records, expected = _records(dataset_dir), _records(reference_dir)
    for split in expected:
        assert len(records[split]) == len(expected[split]) > 0
        for got, want in zip(records[split], expected[split]):
            assert got.keys() == want.keys()
            assert all(np.array_equal(got[k], want[k]) for k in want)
        index, want_index = (read_record_index(d, split) for d in (dataset_dir, reference_dir))
        assert index.keys() == want_index.keys()
        assert all(np.array_equal(index[k], want_index[k]) for k in want_index)


def test_beam_settings_make_the_runner_options():
    args = beam_build.BeamSettings("direct", 3, ("temp_location=/tmp/x", "save_main_session"))
    assert not args.writes_records           # the DirectRunner would hold stage 2 in memory
    assert args.pipeline_args()[:3] == ["--runner=DirectRunner", "--direct_num_workers=3",
                                        "--direct_running_mode=multi_processing"]
    assert args.pipeline_args()[-2:] == ["--temp_location=/tmp/x", "--save_main_session"]
    dataflow = beam_build.BeamSettings("dataflow", 1, ("project=p", "region=europe-west4"))
    assert dataflow.writes_records
    options = dataflow.pipeline_options().get_all_options()
    assert (options["runner"], options["project"], options["region"]) == (
        "DataflowRunner", "p", "europe-west4")
    for bad in (beam_build.BeamSettings("local"), beam_build.BeamSettings("direct", 0),
                beam_build.BeamSettings("direct", 1, ("--project=p",)),
                beam_build.BeamSettings("dataflow", 4)):
        with pytest.raises(ValueError):
            bad.pipeline_args()


@pytest.mark.slow
def test_the_beam_build_command_gives_the_in_process_records_in_order(corpus, tmp_path):
    first, second = corpus["roots"]
    command = [sys.executable, "-m", "input_pipeline.build", "--source", str(first),
               "--source", str(second), "--data-dir", str(tmp_path), "--image-size", "32",
               "--validation-fraction", "0.3", "--runner", "direct", "--workers", "2",
               "--num-shards", "3"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("dataset: ")]
    dataset_dir = Path(line.removeprefix("dataset: "))
    # Records, their order (across three shards per split) and the record index: those of the
    # in-process build.
    assert len(list(dataset_dir.glob("*-train.array_record-*-of-00003"))) == 3
    _assert_same_dataset(dataset_dir, corpus["reference"].dataset_dir)
    # The index describes the stored order: a few records read back by position.
    index, source = read_record_index(dataset_dir, "train"), open_split(dataset_dir, "train")
    for i in (0, len(source) // 2, len(source) - 1):
        assert source[i]["case_id"].decode() == index["case_ids"][index["case"][i]]
        assert int(source[i]["slice_index"]) == index["slice_index"][i]
    # Every case has a progress line from a worker; the bad ones are named in the summary line
    # and in build_report.json.
    total = len(corpus["names"]) + len(BAD_CASES)
    for name in [*corpus["names"], *BAD_CASES]:
        assert re.search(rf"\[\d+/{total}\] {name}: ", run.stderr), name
    summary = run.stdout.splitlines()[-1]
    assert "cases skipped: 2" in summary and all(name in summary for name in BAD_CASES)
    report = json.loads((dataset_dir / "build_report.json").read_text())
    assert {c["case_id"]: c["error_type"] for c in report["cases"]
            if c["status"] == "skipped"} == BAD_CASES
    assert {c["case_id"] for c in report["cases"] if c["status"] == "built"} == set(
        corpus["names"])


# A Beam build whose launcher and worker processes (one process group) are all killed with
# SIGKILL by a worker once 3 work files exist: an abrupt end in the middle of stage 1, no cleanup
# code run anywhere. At most one more case (the other worker's) finishes in between.
_KILLED_BUILD = """
import os, signal, sys
from pathlib import Path
from input_pipeline.beam_build import BeamSettings
from input_pipeline.tfds_builder import BuildOptions, build_dataset

if os.getpgid(0) != os.getpid():
    sys.exit("run me as the leader of a new process group")
roots, data, work = [Path(a) for a in sys.argv[1:3]], Path(sys.argv[3]), Path(sys.argv[4])

def kill_all(report, group=os.getpgid(0)):     # the default: this launcher's process group
    if len([p for p in (work / "cases").glob("*.npz") if not p.name.startswith(".")]) >= 3:
        os.killpg(group, signal.SIGKILL)

build_dataset(roots, data, BuildOptions(image_size=32, validation_fraction=0.3),
              work_dir=work, on_case_done=kill_all, beam=BeamSettings("direct", 2))
"""


@pytest.mark.slow
def test_a_beam_build_killed_midway_resumes_without_loss_or_duplicates(corpus, tmp_path):
    # The rerun writes the records with Beam too (as a cluster runner does), in three shards.
    settings = beam_build.BeamSettings("direct", 2, records_on_beam=True)
    work, data = tmp_path / "work", tmp_path / "data"
    killed = subprocess.run([sys.executable, "-c", _KILLED_BUILD, *map(str, corpus["roots"]),
                             str(data), str(work)], cwd=REPO, capture_output=True, text=True,
                            timeout=600, start_new_session=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    finished = [p for p in (work / "cases").glob("*.npz") if not p.name.startswith(".")]
    done = sorted(p.stem for p in finished)
    assert 3 <= len(done) <= 4 < len(corpus["names"])
    for path in finished:                   # every visible work file is whole
        assert load_case_slices(path).num_slices > 0
    assert not (data / "med_sam_slices" / "size32" / "2.0.0").exists()

    lines = []
    resumed = build_dataset(corpus["roots"], data, OPTIONS, work_dir=work, log=lines.append,
                            beam=settings, num_shards=3)
    statuses = {r.case_id: r.status for r in resumed.reports}
    assert {c for c, s in statuses.items() if s == "reused"} == set(done)
    assert {c for c, s in statuses.items() if s == "built"} == set(corpus["names"]) - set(done)
    assert {c for c, s in statuses.items() if s == "skipped"} == set(BAD_CASES)
    assert all(f"skipped {name}" in lines[-1] for name in BAD_CASES)     # the summary
    assert len(list(resumed.dataset_dir.glob("*-train.array_record-*-of-00003"))) == 3
    _assert_same_dataset(resumed.dataset_dir, corpus["reference"].dataset_dir)
    # Temporaries of the work files being written at the kill are gone.
    assert not [p for p in (work / "cases").iterdir() if p.name.startswith(".")]
