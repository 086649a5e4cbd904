"""benchmarks/data_scale.py and its parts: the release-shaped corpus, the process-tree monitor,
and the smoke run's report."""

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from input_pipeline.sources import CaseSource, read_training_case

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    # From its file, not through sys.path: benchmarks/input_pipeline.py would shadow the package.
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


scale_corpus = _load("scale_corpus")
tree_monitor = _load("tree_monitor")


def _small_mix():
    return tuple(s.__class__(**{**s.__dict__, "side": (32, 48) if s.is_3d else (40, 90),
                                "depth": (5, 9) if s.is_3d else None})
                 for s in scale_corpus.RELEASE_MIX)


def test_plan_is_seeded_and_a_smaller_corpus_is_a_prefix_of_a_larger_one():
    small = scale_corpus.corpus_plan(3, 2_000)
    large = scale_corpus.corpus_plan(3, 8_000)
    assert scale_corpus.plan_json(large[:len(small)]) == scale_corpus.plan_json(small)
    assert scale_corpus.plan_json(scale_corpus.corpus_plan(3, 8_000)) == \
        scale_corpus.plan_json(large)
    assert scale_corpus.plan_json(scale_corpus.corpus_plan(4, 2_000)) != \
        scale_corpus.plan_json(small)
    described = scale_corpus.describe(large)
    assert described["records"] >= 8_000
    assert 0.8 < described["records_3d_fraction"] < 0.95      # most slices from volumes
    shapes_3d = [c.shape for c in large if c.spec.is_3d]
    assert all(50 <= d <= 500 and h <= 512 for d, h, _ in shapes_3d)
    assert max(max(c.shape) for c in large if not c.spec.is_3d) > 1500     # large 2D images
    assert len(described["datasets"]) == len(scale_corpus.RELEASE_MIX)


def test_written_cases_are_valid_challenge_files_with_the_planned_slices(tmp_path):
    plan = scale_corpus.corpus_plan(0, 60, _small_mix())
    sizes = scale_corpus.write_corpus(tmp_path, plan)
    assert set(sizes) == {c.number for c in plan} and min(sizes.values()) > 0
    for case in plan[:12]:
        path = tmp_path / case.relative_path
        assert path.parent.parent.parent == tmp_path        # <Modality>/<Dataset>/<case>.npz
        with np.load(path) as archive:
            imgs, gts = archive["imgs"], archive["gts"]
        assert imgs.dtype == np.uint8
        assert imgs.shape == (case.shape if case.spec.is_3d else case.shape + (3,))
        assert gts.shape == case.shape
        # The builder's reader accepts it, and the slices holding an object are the plan's.
        training = read_training_case(CaseSource(case.case_id, "npz", path))
        assert training.is_3d == case.spec.is_3d
        assert len(training.foreground_slices()) == case.records
        assert len(np.unique(gts)) > 1 and imgs.std() > 5       # objects, not a flat image
    # Deterministic: the same case written again is the same array.
    again = tmp_path / "again"
    scale_corpus.write_corpus(again, plan[:3])
    for case in plan[:3]:
        with np.load(tmp_path / case.relative_path) as a, np.load(again / case.relative_path) as b:
            assert np.array_equal(a["imgs"], b["imgs"]) and np.array_equal(a["gts"], b["gts"])


_HOLDER = textwrap.dedent("""
    import subprocess, sys, tempfile, os
    files = [tempfile.TemporaryFile() for _ in range(int(sys.argv[1]))]
    block = bytearray(int(sys.argv[2]) * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1                                       # touch every page: resident
    if sys.argv[3] == "parent":                            # the same again in a child
        child = subprocess.Popen([sys.executable, __file__, sys.argv[1], sys.argv[2], "child"])
        child.wait()
    else:
        import time; time.sleep(1.5)                   # hold it all while sampled
""")


def test_monitor_sees_the_open_files_and_memory_of_the_whole_tree(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    files, mib = 40, 60
    process = subprocess.Popen([sys.executable, str(script), str(files), str(mib), "parent"])
    with tree_monitor.TreeMonitor(process.pid, interval=0.05) as monitor:
        process.wait()
    assert process.returncode == 0
    peak = monitor.peak
    # Parent and child each hold `files` files beyond stdin/out/err and `mib` MiB.
    assert peak.processes == 2
    assert peak.open_files >= 2 * (files + 3)
    assert peak.rss_bytes >= 2 * mib * 2**20
    assert monitor.peak_single_rss_bytes >= mib * 2**20
    assert peak.memory_maps >= 2 * 20           # an interpreter maps its libraries


def test_monitor_of_a_finished_process_reports_nothing():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    monitor = tree_monitor.TreeMonitor(process.pid)
    monitor.sample()
    assert monitor.samples == 0 and monitor.peak.open_files == 0


def _row(text: str, name: str) -> list[float]:
    match = re.search(rf"^{re.escape(name)}\s+(.*)$", text, re.MULTILINE)
    assert match, f"row {name!r} missing from:\n{text}"
    values = match.group(1).split()
    return [float(v.replace(",", "")) for v in values[:3]]


def test_smoke_run_prints_every_figure_and_they_are_sane():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_scale.py"), "--smoke"],
                         cwd=ROOT, capture_output=True, text=True, timeout=230,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    # Every planned slice was built (the generator's guarantee), for both sizes.
    for planned, built in re.findall(r"(\d+) planned slices.*?\n.*?built (\d+) slices", out,
                                     re.DOTALL):
        assert planned == built
    assert out.count("every slice once: True") == 2
    small, large, ratio = _row(out, "slices (records)")
    assert 0 < small < large and ratio == pytest.approx(large / small, abs=0.01)
    for name in ("build slices/s", "build slices per CPU-second", "cache slices/s",
                 "loader W=1 steady examples/s per worker", "source bytes per slice",
                 "dataset bytes per slice", "cache bytes per train slice"):
        assert min(_row(out, name)[:2]) > 0, name
    # The teacher cache holds one 8 x 8 x 256 float16 embedding (32 KiB) per slice, plus shard
    # headers: an independent check of the bytes measured on disk.
    assert 32 * 1024 <= _row(out, "cache bytes per train slice")[1] < 48 * 1024
    for step in ("build", "cache", "loader_w1"):
        assert min(_row(out, f"{step} peak open files")[:2]) >= 3        # stdin/out/err at least
        assert min(_row(out, f"{step} peak memory maps")[:2]) >= 50
        assert min(_row(out, f"{step} peak RSS MiB")[:2]) >= 20
    # (The first step runs before any helper process exists; later ones may see grain's.)
    assert _row(out, "build peak processes")[0] == 1
    # The loader's grain worker is a child process: the monitor must see it.
    assert min(_row(out, "loader_w1 peak processes")[:2]) >= 2
    assert re.search(r"peak memory, open files and memory maps (do not grow|GROW)", out)
    assert re.search(r"1M slices: build [\d.]+ h; teacher cache .* [\d.]+ h; loader epoch W=1 "
                     r"[\d.]+ h", out)
    assert re.search(r"3M slices on disk: source [\d,]+ GB; dataset [\d,]+ GB", out)
    cores = re.search(r"cores to feed 8 GPUs at 250 images/s each \(2000 examples/s\): (\d+)", out)
    assert cores and int(cores.group(1)) >= 2
