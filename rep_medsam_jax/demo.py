"""The main job end to end on built-in data (``make demo``): the whole life of a model on a CPU.

1. held-out test cases: generated 2D and 3D phantoms and the real MNI152 brain (nilearn);
2. distil the tiny student's encoder from a small (random) ViT teacher on phantom training
   data (configs/demo_distill.py), online, with checkpoints;
3. train the whole pipeline from the distilled encoder (configs/local.py);
4. fold and export to ONNX (verified against JAX);
5. segment the held-out cases with the CPU predictor (onnxruntime, no JAX in the loop);
6. evaluate DSC / NSD, write overlay PNGs; the learning curves are in each stage's workdir.

A second run reuses what the first built (datasets, checkpoints, trained stages); pass
``--fresh`` to start over.

    python -m rep_medsam_jax.demo --out demo_output [--fresh]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Pipeline training data: configs/local.py's 40 2D phantom cases plus slices of 3D phantom
# volumes, so that the held-out 3D cases are not out of distribution.
SEG_PHANTOMS = (40, 4)


class _Timer:
    def __init__(self):
        self.stages: list[tuple[str, float]] = []

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.stages.append((name, time.perf_counter() - start))
        return result


def make_test_cases(out: Path):
    """Held-out cases (a seed never used for training) + the MNI152 brain."""
    from input_pipeline.phantoms import mni152_case, write_phantom_dataset

    data = write_phantom_dataset(out, n2d=5, n3d=2, seed=1000, size_2d=160,
                                 shape_3d=(20, 96, 112),
                                 modalities_2d=("CT", "MR", "US", "Endoscopy", "Dermoscopy"))
    mni152_case(out, downsample=4)
    return data


def train_stage(config_path: Path, workdir: Path, total_steps: int | None = None,
                phantoms: tuple[int, int] | None = None, **replace_model):
    from rep_medsam_jax.training.config import load_config
    from rep_medsam_jax.training.loop import train_and_evaluate

    config = load_config(config_path)
    if replace_model:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                       **replace_model))
    if phantoms is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                      phantoms=phantoms))
    if total_steps is not None:
        config = dataclasses.replace(config, total_steps=total_steps,
                                     eval_every_steps=min(config.eval_every_steps, total_steps))
    return train_and_evaluate(config, workdir)


def _is_export_of(export_dir: Path, model_dir: Path) -> bool:
    """Does ``export_dir`` hold a finished export of ``model_dir``? (export.json is written
    last, after verification, so its presence means the export completed.)"""
    import json

    try:
        meta = json.loads((export_dir / "export.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("source_model_dir") == str(model_dir)
            and all((export_dir / name).is_file() for name in meta.get("checksums", {})))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="where everything goes")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--distill-steps", type=int, default=None,
                        help="distillation steps (default: configs/demo_distill.py's 120)")
    parser.add_argument("--seg-steps", type=int, default=None,
                        help="pipeline-training steps (default: configs/local.py's 500)")
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()

    test_dir = out / "test_data"
    if not (test_dir / "gts").is_dir():
        timer.run("held-out test cases (phantoms + MNI152)", make_test_cases, test_dir)
    distill = timer.run("stage 1: distillation (tiny student, online ViT teacher)",
                        train_stage, ROOT / "configs" / "demo_distill.py",
                        out / "train" / "distill", args.distill_steps)
    # The next stage starts from the previous stage's WORKDIR (its best checkpoint).
    seg = timer.run("stage 2: pipeline training (from the distilled encoder)", train_stage,
                    ROOT / "configs" / "local.py", out / "train" / "seg", args.seg_steps,
                    SEG_PHANTOMS,
                    init_from=str(distill.workdir), init_parts=("image_encoder",))

    from rep_medsam_jax.export.onnx_export import export_model_dir

    export_dir = out / "export"
    if seg.start_step == seg.total_steps and _is_export_of(export_dir, seg.model_dir):
        print(f"\nreusing the export of the finished model in {export_dir}")
    else:
        timer.run("fold + export to ONNX (verified)", export_model_dir, seg.model_dir,
                  export_dir, overwrite=True)

    from rep_medsam_jax.metrics import evaluate_folder
    from rep_medsam_jax.predictor.backend import open_backend
    from rep_medsam_jax.predictor.run import predict_folder

    backend = open_backend(export_dir, "onnx")
    summary = timer.run("predict held-out cases (onnxruntime)", predict_folder, backend,
                        test_dir / "inputs", out / "predictions",
                        overlay_dir=out / "overlays")
    rows = timer.run("evaluate DSC / NSD", evaluate_folder, out / "predictions",
                     test_dir / "gts", out / "metrics.csv")

    print("\n=== report ===")
    for name, seconds in timer.stages:
        print(f"{seconds:8.1f} s  {name}")
    print(f"\n{'case':28s} {'DSC':>7s} {'NSD':>7s} {'time':>8s}")
    times = {r.name: r.seconds for r in summary.results}
    for row in rows:
        print(f"{row['case']:28s} {row['dsc']:7.4f} {row['nsd']:7.4f} "
              f"{times.get(row['case'], float('nan')):7.2f}s")
    phantoms = [row["dsc"] for row in rows if "MNI152" not in row["case"]]
    if phantoms:
        print(f"mean DSC over the {len(phantoms)} held-out phantom cases: "
              f"{sum(phantoms) / len(phantoms):.4f}")
    print(summary.report())
    print(f"\nvalidation after training: {seg.last_eval}")
    print(f"outputs in {out}: predictions/, overlays/, metrics.csv, export/ (ONNX), "
          f"train/*/learning_curves.png, train/*/metrics.jsonl, train/seg/model (MODEL_DIR)")
    return 0 if not summary.failures else 1


if __name__ == "__main__":
    sys.exit(main())
