"""Does the input pipeline hold at the size of the challenge's training release? Two corpus sizes
side by side: build, teacher cache and one loader epoch each, with rates, bytes per slice on disk
and the peak memory, open files and memory maps of every step; the large/small ratio of each
peak shows whether it grows with the corpus (it must not).

    python benchmarks/data_scale.py [--slices 25000 100000] [--root scale-data]
        [--build-workers 2] [--cache-workers 2] [--loader-workers 1 2] [--batch-size 16]
    python benchmarks/data_scale.py --smoke          # tiny corpus, in one process: a check

The corpus (``benchmarks/scale_corpus.py``) is synthetic and shaped like the CVPR 2024
MedSAM-on-laptop training release: ``ROOT/corpus/<Modality>/<Dataset>/<case>.npz`` challenge
files (``imgs`` + ``gts``), ~88% of the slices from 3D CT / MR / PET volumes of 50-500 slices
at 192-512 pixels in-plane, the rest 2D images of seven modalities up to 2000 x 2000, several
objects per slice, smooth shapes plus noise. It is written once (resumable) for the largest
size; a smaller size is the first cases of the same plan, seen through a folder of links.

Each step runs in its own process, as a user runs it, under a monitor of its process tree
(``benchmarks/tree_monitor.py``: summed RSS, open files, memory maps, sampled every 0.2 s):

1. build: ``python -m input_pipeline.build --source CORPUS --data-dir RUN/data`` (with
   ``--runner direct --workers N`` for N > 0 build workers: Apache Beam's DirectRunner);
2. teacher cache: ``python -m input_pipeline.teacher_cache`` with a small random ViT
   (``vit_tiny``: the code path of MedSAM's ViT-B, far too slow on a CPU) and ``--workers``;
3. one loader epoch (``make_loader(..., num_epochs=1)``, distillation augmentation, the cache
   joined) for each ``--loader-workers`` count, checked to yield every training slice once.

The small size's dataset and cache are deleted before the large one is built (disk), unless
``--keep``. ``--smoke`` runs the same steps in this process on a tiny corpus (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/input_pipeline.py is named like the package: this folder goes to the end of the
# import path (for the grain worker processes too, which inherit it and re-import this file), so
# `import input_pipeline` finds the package and `import scale_corpus` still finds its sibling.
_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent
sys.path[:] = [str(_REPO)] + [p for p in sys.path if Path(p or ".").resolve() not in
                                (_HERE, _REPO)] + [str(_HERE)]

import scale_corpus  # noqa: E402
from record import (add_out_argument, default_out, out_from_argv, recorded_output,  # noqa: E402
                    write_json)
from tree_monitor import TreeMonitor, TreeSample  # noqa: E402

GPUS, IMAGES_PER_GPU = 8, 250          # the host to feed: 8 GPUs at 250 images/s each
VIT_B_BYTES_PER_SLICE = 64 * 64 * 256 * 2      # MedSAM ViT-B embedding, float16
GROWTH_RATIO = 1.25                    # a peak this much higher at the large size "grows"...
GROWTH_FLOOR = {"rss_bytes": 64 * 2**20, "open_files": 16, "memory_maps": 64}  # ...and by this


@dataclasses.dataclass
class StepResult:
    """One monitored step: wall and CPU seconds, the tree's peaks, what it produced."""

    name: str
    seconds: float
    cpu_seconds: float
    peak: TreeSample
    peak_single_rss_bytes: int
    samples: int
    extra: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Running one step: a child process (real runs) or this process (smoke), under the monitor
# --------------------------------------------------------------------------------------------

def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_child(name: str, argv: list[str], log_path: Path) -> StepResult:
    """Run ``python argv`` with the repository on the path, monitoring its process tree."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(_REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cpu, start = _cpu_seconds(), time.perf_counter()
    with open(log_path, "ab") as log:
        child = subprocess.Popen([sys.executable, *argv], cwd=_REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        with TreeMonitor(child.pid) as monitor:
            code = child.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"step {name} failed (exit {code}); end of {log_path}:\n{tail}")
    return StepResult(name, seconds, _cpu_seconds() - cpu, monitor.peak,
                      monitor.peak_single_rss_bytes, monitor.samples)


def run_here(name: str, function, *args) -> StepResult:
    """Run ``function(*args)`` in this process under the monitor (smoke mode); a dict it
    returns goes to ``extra``."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    with TreeMonitor(os.getpid(), interval=0.05) as monitor:
        value = function(*args)
    return StepResult(name, time.perf_counter() - start, _cpu_seconds() - cpu, monitor.peak,
                      monitor.peak_single_rss_bytes, monitor.samples,
                      value if isinstance(value, dict) else {})


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------

def build_argv(view: Path, data_dir: Path, workers: int) -> list[str]:
    argv = ["--source", str(view), "--data-dir", str(data_dir)]
    if workers > 0:
        argv += ["--runner", "direct", "--workers", str(workers)]
    return argv


def cache_argv(dataset_dir: Path, cache_dir: Path, workers: int, batch_size: int) -> list[str]:
    return ["--dataset-dir", str(dataset_dir), "--split", "train", "--out", str(cache_dir),
            "--random-init", "0", "--variant", "vit_tiny", "--workers", str(workers),
            "--batch-size", str(batch_size)]


def zero_teacher_cache(dataset_dir: Path, cache_dir: Path, batch_size: int) -> None:
    """Smoke mode: the cache of ``vit_tiny``'s shape (8 x 8 x 256) written by the real cache
    code with zeros for the teacher's output (its ``encode_fn`` hook), so no JAX is loaded."""
    import numpy as np  # noqa: PLC0415

    from input_pipeline.teacher_cache import Teacher, build_teacher_cache  # noqa: PLC0415
    from rep_medsam_jax.models.config import VIT_VARIANTS  # noqa: PLC0415

    teacher = Teacher(VIT_VARIANTS["vit_tiny"], {}, "smoke:zeros")

    def encode(batch: dict) -> np.ndarray:
        return np.zeros((len(batch["slice"]),) + teacher.embedding_shape, np.float16)

    build_teacher_cache(dataset_dir, "train", cache_dir, teacher, batch_size=batch_size,
                        encode_fn=encode, log=lambda _line: None)


def loader_epoch(dataset_dir: str, cache_dir: str, workers: int, batch_size: int,
                 batches: int | None = None, augment: str = "distill") -> dict:
    """Stream one epoch (or ``batches`` batches) of the training split; counts and times.

    The epoch is checked: every record index comes exactly once.
    """
    import numpy as np  # noqa: PLC0415

    from input_pipeline.augment import DISTILL_AUGMENT, FINETUNE_AUGMENT  # noqa: PLC0415
    from input_pipeline.loader import make_loader  # noqa: PLC0415

    start = time.perf_counter()
    loader = make_loader(dataset_dir, "train", batch_size=batch_size, seed=0,
                         augment=DISTILL_AUGMENT if augment == "distill" else FINETUNE_AUGMENT,
                         num_epochs=1, worker_count=workers, drop_remainder=False,
                         teacher_cache_dir=cache_dir or None)
    iterator = iter(loader)
    seen, first_batch_at, count = [], None, 0
    for number, batch in enumerate(iterator):
        if first_batch_at is None:
            first_batch_at = time.perf_counter()
        # A copy: the batch's arrays may be views of grain's shared-memory blocks, and
        # keeping those alive would hold one open descriptor and one map per batch.
        seen.append(np.array(batch["index"], copy=True))
        count += int(batch["index"].shape[0])
        if batches is not None and number + 1 >= batches:
            break
    end = time.perf_counter()
    first_size = int(seen[0].shape[0]) if seen else 0
    result = {"examples": count, "seconds": end - start,
              "startup_seconds": (first_batch_at or end) - start,
              "steady_examples_per_s": (count - first_size) / max(end - (first_batch_at or end),
                                                                  1e-9)}
    if batches is None:
        from input_pipeline.tfds_builder import open_split  # noqa: PLC0415

        indices = np.concatenate(seen) if seen else np.zeros(0, np.int64)
        records = len(open_split(dataset_dir, "train"))
        result["every_record_once"] = bool(indices.size == records
                                           and np.unique(indices).size == records)
    return result


def _loader_child_main(args: argparse.Namespace) -> None:
    result = loader_epoch(args.dataset_dir, args.cache_dir, args.workers, args.batch_size,
                          args.batches, args.augment)
    Path(args.result).write_text(json.dumps(result))


def disk_bytes(path: Path) -> int:
    """Bytes on disk (allocated blocks) of the files under ``path``. Links are not followed:
    the corpus view's links to the source files must not count the corpus twice."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _dataset_dir(data_dir: Path) -> Path:
    found = sorted(data_dir.glob("med_sam_slices/size*/*/build_report.json"))
    if not found:
        raise RuntimeError(f"no built dataset under {data_dir}")
    return found[-1].parent


# --------------------------------------------------------------------------------------------
# One size
# --------------------------------------------------------------------------------------------

def run_size(label: str, plan: list, corpus: Path, work: Path, args: argparse.Namespace,
             in_process: bool) -> dict:
    """Build, cache and stream the corpus of ``plan``; every figure of this size."""
    view = scale_corpus.link_view(corpus, work / "view", plan)
    from input_pipeline.sources import discover_sources  # noqa: PLC0415

    found = len(discover_sources(view))
    if found != len(plan):
        raise SystemExit(f"discovery found {found} of the {len(plan)} cases under {view}")
    layout = "nested <Modality>/<Dataset>/<case>.npz"
    data_dir, cache_dir, log = work / "data", work / "cache", work / "steps.log"
    print(f"[{label}] {len(plan)} cases, {sum(c.records for c in plan)} planned slices; "
          f"layout {layout}", flush=True)

    steps: dict[str, StepResult] = {}
    argv = build_argv(view, data_dir, args.build_workers)
    build_runner = "direct" if "--runner" in argv else "in-process (serial)"
    if in_process:
        from input_pipeline.build import main as build_main  # noqa: PLC0415

        steps["build"] = run_here("build", build_main, argv)
    else:
        steps["build"] = run_child("build", ["-m", "input_pipeline.build", *argv], log)
    dataset_dir = _dataset_dir(data_dir)
    report = json.loads((dataset_dir / "build_report.json").read_text())
    slices = sum(report["split_sizes"].values())
    train = report["split_sizes"]["train"]
    objects = sum(report.get("object_counts", {}).values())
    skipped = sum(1 for case in report["cases"] if case["status"] == "skipped")
    print(f"[{label}] built {slices} slices ({train} train, {objects} objects, {skipped} "
          f"cases skipped) in {steps['build'].seconds:.0f} s", flush=True)

    cache_command = cache_argv(dataset_dir, cache_dir, args.cache_workers, args.batch_size)
    if in_process:
        steps["cache"] = run_here("cache", zero_teacher_cache, dataset_dir, cache_dir,
                                  args.batch_size)
    else:
        steps["cache"] = run_child("cache", ["-m", "input_pipeline.teacher_cache",
                                             *cache_command], log)
    print(f"[{label}] teacher cache of {train} slices in {steps['cache'].seconds:.0f} s",
          flush=True)

    for workers in args.loader_workers:
        name = f"loader_w{workers}"
        if in_process:
            steps[name] = run_here(name, loader_epoch, str(dataset_dir), str(cache_dir),
                                   workers, args.batch_size)
        else:
            result_file = work / f"{name}.json"
            steps[name] = run_child(name, [str(Path(__file__).resolve()), "--loader-child",
                                           "--dataset-dir", str(dataset_dir), "--cache-dir",
                                           str(cache_dir), "--workers", str(workers),
                                           "--batch-size", str(args.batch_size),
                                           "--result", str(result_file)], log)
            steps[name].extra = json.loads(result_file.read_text())
        extra = steps[name].extra
        print(f"[{label}] loader epoch, {workers} worker(s): {extra['examples']} examples in "
              f"{steps[name].seconds:.0f} s; every slice once: {extra['every_record_once']}",
              flush=True)

    sizes = {"source": sum(os.stat(corpus / c.relative_path).st_blocks * 512 for c in plan),
             "dataset": disk_bytes(dataset_dir),
             "work": disk_bytes(data_dir) - disk_bytes(dataset_dir),
             "cache": disk_bytes(cache_dir)}
    result = {"label": label, "cases": len(plan), "slices": slices, "train_slices": train,
              "objects": objects, "skipped_cases": skipped, "layout": layout,
              "build_runner": build_runner,
              "bytes": sizes, "steps": {k: dataclasses.asdict(v) for k, v in steps.items()}}
    if args.finetune_batches and not in_process:
        result_file = work / "finetune.json"
        step = run_child("finetune", [str(Path(__file__).resolve()), "--loader-child",
                                      "--dataset-dir", str(dataset_dir), "--cache-dir", "",
                                      "--workers", "1", "--batch-size", str(args.batch_size),
                                      "--batches", str(args.finetune_batches),
                                      "--augment", "finetune", "--result", str(result_file)],
                         log)
        step.extra = json.loads(result_file.read_text())
        result["steps"]["finetune_w1"] = dataclasses.asdict(step)
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _rates(size: dict) -> dict[str, float]:
    steps, slices, train = size["steps"], size["slices"], size["train_slices"]
    rates = {"build slices/s": slices / steps["build"]["seconds"],
             "build slices per CPU-second": slices / max(steps["build"]["cpu_seconds"], 1e-9),
             "cache slices/s": train / steps["cache"]["seconds"]}
    for name, step in steps.items():
        if name.startswith("loader_w"):
            workers = int(name[len("loader_w"):])
            rate = step["extra"]["examples"] / step["seconds"]
            steady = step["extra"]["steady_examples_per_s"]
            rates[f"loader W={workers} epoch examples/s"] = rate
            rates[f"loader W={workers} steady examples/s"] = steady
            rates[f"loader W={workers} steady examples/s per worker"] = steady / max(workers, 1)
    return rates


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def report(sizes: list[dict], build_cores: int) -> dict:
    """Print the side-by-side table, the growth check, the projection and the cores answer;
    return the summary that goes into the JSON result."""
    small, large = sizes[0], sizes[-1]
    names = [s["label"] for s in sizes]
    rows: list[tuple[str, list[float], bool]] = []     # (name, values, peak row)
    rows.append(("slices (records)", [s["slices"] for s in sizes], False))
    rows.append(("cases", [s["cases"] for s in sizes], False))
    rows.append(("objects", [s["objects"] for s in sizes], False))
    rates = [_rates(s) for s in sizes]
    for key in rates[0]:
        rows.append((key, [r[key] for r in rates], False))
    rows.append(("build slices/s per core", [r["build slices/s"] / build_cores for r in rates],
                 False))
    for kind in ("source", "dataset", "work", "cache"):
        per = "train slice" if kind == "cache" else "slice"
        count = "train_slices" if kind == "cache" else "slices"
        label = {"work": "build work files (stage 1)"}.get(kind, kind)
        rows.append((f"{label} bytes per {per}", [s["bytes"][kind] / s[count] for s in sizes],
                     False))
    growth = []
    for step in small["steps"]:
        for field, unit in (("rss_bytes", "MiB"), ("open_files", ""), ("memory_maps", "")):
            values = [s["steps"][step]["peak"][field] / (2**20 if unit else 1) for s in sizes]
            title = {"rss_bytes": "peak RSS MiB", "open_files": "peak open files",
                     "memory_maps": "peak memory maps"}[field]
            rows.append((f"{step} {title}", values, True))
            raw_small = small["steps"][step]["peak"][field]
            raw_large = large["steps"][step]["peak"][field]
            grows = (raw_large > GROWTH_RATIO * raw_small
                     and raw_large - raw_small > GROWTH_FLOOR[field])
            growth.append({"step": step, "field": field, "small": raw_small, "large": raw_large,
                           "ratio": raw_large / max(raw_small, 1), "grows": grows})
        values = [s["steps"][step]["peak"]["processes"] for s in sizes]
        rows.append((f"{step} peak processes", values, True))

    width = max(len(r[0]) for r in rows) + 2
    print("\n" + "".ljust(width) + "".join(f"{n:>14}" for n in names) + f"{'large/small':>14}")
    flags = {(g["step"], g["field"]): g["grows"] for g in growth}
    for name, values, is_peak in rows:
        ratio = values[-1] / values[0] if values[0] else float("nan")
        note = ""
        if is_peak:
            step, field = name.split(" ", 1)
            key = {"peak RSS MiB": "rss_bytes", "peak open files": "open_files",
                   "peak memory maps": "memory_maps"}.get(field)
            if key is not None:
                note = "  GROWS" if flags[(step, key)] else "  flat"
        print(name.ljust(width) + "".join(f"{_fmt(v):>14}" for v in values)
              + f"{ratio:>14.2f}{note}")
    grows = [g for g in growth if g["grows"]]
    print(f"\ncorpus grew {large['slices'] / small['slices']:.2f}x; peak memory, open files and "
          "memory maps " + ("do not grow with it (each within "
                            f"{GROWTH_RATIO:.2f}x or a small absolute margin)" if not grows else
                            "GROW with it: " + ", ".join(f"{g['step']} {g['field']} "
                                                         f"{g['ratio']:.2f}x" for g in grows)))

    large_rates = rates[-1]
    projection = {}
    print("\nprojection (time linear in slices at the large size's rates; bytes per slice "
          "constant; one host as measured here):")
    for million in (1, 3):
        n = million * 1_000_000
        hours = {"build": n / large_rates["build slices/s"] / 3600,
                 "teacher cache (vit_tiny, this CPU)": n / large_rates["cache slices/s"] / 3600}
        for key, value in large_rates.items():
            if key.startswith("loader W=") and key.endswith("steady examples/s"):
                hours[f"loader epoch {key.split()[1]}"] = n / value / 3600
        disk = {kind: n * large["bytes"][kind] / large[("train_slices" if kind == "cache"
                                                        else "slices")]
                for kind in ("source", "dataset", "work", "cache")}
        disk["cache at ViT-B (64x64x256 float16)"] = n * VIT_B_BYTES_PER_SLICE
        projection[f"{million}M"] = {"hours": hours, "bytes": disk}
        print(f"  {million}M slices: " + "; ".join(f"{k} {v:.1f} h" for k, v in hours.items()))
        print(f"  {million}M slices on disk: " + "; ".join(f"{k} {v / 1e9:,.0f} GB"
                                                         for k, v in disk.items()))

    per_worker = min(v for k, v in large_rates.items() if k.endswith("per worker"))
    need = GPUS * IMAGES_PER_GPU
    cores = math.ceil(need / per_worker) + 1
    print(f"\ncores to feed {GPUS} GPUs at {IMAGES_PER_GPU} images/s each ({need} examples/s): "
          f"{cores} = ceil({need} / {per_worker:.0f} examples/s per loader worker) + 1 for the "
          "training process (assumes one worker per core, linear in workers, the distillation "
          "stream measured here)")
    answer = {"examples_per_s_needed": need, "per_worker_examples_per_s": per_worker,
              "cores": cores}
    finetune = large["steps"].get("finetune_w1")
    if finetune:
        rate = finetune["extra"]["steady_examples_per_s"]
        cores_ft = math.ceil(need / rate) + 1
        answer.update(finetune_per_worker_examples_per_s=rate, finetune_cores=cores_ft)
        print(f"  with the fine-tuning stream (colour jitter, host-finished float32 images): "
              f"{rate:.0f} examples/s per worker -> {cores_ft} cores")
    return {"growth": growth, "projection": projection, "cores_for_8_gpus": answer,
            "rates": dict(zip(names, rates))}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

SMOKE_MIX = tuple(dataclasses.replace(
    spec, side=(32, 48) if spec.is_3d else (40, 96),
    depth=(4, 8) if spec.is_3d else None) for spec in scale_corpus.RELEASE_MIX)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, nargs=2, default=(25_000, 100_000),
                        metavar=("SMALL", "LARGE"), help="training slices of the two sizes")
    parser.add_argument("--root", default="scale-data",
                        help="corpus and run folders (the corpus is kept for reruns)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gen-processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--build-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache-workers", type=int, default=2)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=(1, 2))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--finetune-batches", type=int, default=100,
                        help="also time this many fine-tuning batches (1 worker) at each size")
    parser.add_argument("--keep", action="store_true",
                        help="keep each size's dataset and cache (default: delete the small "
                             "size's before the large is built)")
    parser.add_argument("--corpus-only", action="store_true",
                        help="write the corpus (resumable) and stop")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny corpus, every step in this process, a temporary root")
    add_out_argument(parser, "data_scale")
    # The loader step's own process (internal).
    parser.add_argument("--loader-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset-dir", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--augment", default="distill", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def main(args: argparse.Namespace) -> None:
    if args.smoke:
        args.slices, args.loader_workers, args.cache_workers = (12, 36), (1,), 0
        args.build_workers, args.batch_size, args.finetune_batches = 0, 4, 0
    small_target, large_target = sorted(args.slices)
    mix = SMOKE_MIX if args.smoke else scale_corpus.RELEASE_MIX
    with tempfile.TemporaryDirectory(prefix="data_scale_") as tmp:
        root = Path(tmp) if args.smoke else Path(args.root)
        corpus = root / "corpus"
        plan = scale_corpus.corpus_plan(args.seed, large_target, mix)
        small_plan = plan[:next(i + 1 for i in range(len(plan)) if
                                sum(c.records for c in plan[:i + 1]) >= small_target)]
        # Cases are named by number: a corpus of another seed or mix must not be mixed in.
        stamp, identity = corpus / "corpus.json", json.dumps({"seed": args.seed,
                                                              "mix": repr(mix)})
        if stamp.is_file() and stamp.read_text() != identity:
            raise SystemExit(f"{corpus} holds a corpus of another seed or mix; remove it or "
                             "use another --root")
        corpus.mkdir(parents=True, exist_ok=True)
        stamp.write_text(identity)
        described = scale_corpus.describe(plan)
        print(f"corpus: {described['cases']} cases, {described['records']} slices "
              f"({described['records_3d_fraction']:.0%} from 3D volumes), largest 2D side "
              f"{described['largest_2d_side']}, {described['raw_bytes'] / 1e9:.1f} GB "
              "uncompressed", flush=True)
        start = time.perf_counter()
        from tqdm import tqdm  # noqa: PLC0415

        with tqdm(total=described["records"], unit="slice", desc="writing corpus",
                  disable=args.smoke, mininterval=5) as bar:
            scale_corpus.write_corpus(corpus, plan, processes=1 if args.smoke
                                      else args.gen_processes, progress=bar.update)
        corpus_bytes = sum(os.stat(corpus / c.relative_path).st_blocks * 512 for c in plan)
        print(f"corpus ready in {time.perf_counter() - start:.0f} s: "
              f"{corpus_bytes / 1e9:.2f} GB on disk "
              f"({corpus_bytes / described['records'] / 1e3:.0f} KB per slice)", flush=True)
        if args.corpus_only:
            return

        sizes = []
        for label, part in (("small", small_plan), ("large", plan)):
            work = root / "runs" / label
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            sizes.append(run_size(label, part, corpus, work, args, in_process=args.smoke))
            (root / "runs" / f"{label}-result.json").write_text(json.dumps(sizes[-1], indent=1))
            used = corpus_bytes + disk_bytes(root / "runs")
            print(f"[{label}] disk in use (corpus + runs): {used / 1e9:.1f} GB", flush=True)
            if label == "small" and not args.keep:
                shutil.rmtree(work)
        build_cores = max(1, min(args.build_workers, os.cpu_count() or 1)) \
            if sizes[-1]["build_runner"] == "direct" else 1
        if args.smoke:
            print("(smoke: every step runs in this one process, so its peaks add up from step "
                  "to step; the growth check means something only in a real run)")
        summary = report(sizes, build_cores)
        summary.update(sizes=sizes, corpus=described | {"disk_bytes": corpus_bytes},
                       build_cores=build_cores)
        if not args.smoke and args.out != "-":
            write_json(Path(args.out).with_suffix(".json") if args.out
                       else default_out("data_scale", ".json"), summary)


if __name__ == "__main__":
    arguments = _parser().parse_args()
    if arguments.loader_child:
        _loader_child_main(arguments)
    else:
        with recorded_output(None if arguments.smoke else out_from_argv("data_scale")):
            main(arguments)
