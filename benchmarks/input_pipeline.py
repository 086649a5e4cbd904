"""Is the input pipeline ever the bottleneck? Examples per second the loader delivers (with the
fine-tuning augmentation, and with teacher embeddings joined for distillation) vs the time one
jitted training step of the full-size model takes per example, on this machine's CPU.

    python benchmarks/input_pipeline.py [--cases 12 3] [--batch-size 8] [--batches 30]
                                        [--workers 0 2] [--step-batch 2] [--skip-step]
    python benchmarks/input_pipeline.py --host-cpu [--batches 30]

``--host-cpu``: host CPU microseconds per example (``time.process_time``, one process, no
workers) of the fine-tuning stream up to the device, images finished on the host (float32
normalisation and colour jitter, what the loader did before) vs on the device (uint8 images,
jitter only drawn; ``make_loader(device_images=True)``), measured side by side in the same run
with the ratio; plus the device's work per example for the latter (on a CPU-only machine that
device is the CPU too). Writes benchmarks/results/input_host_cpu.json.

Data: built-in phantoms (2D at 256 x 256 of every modality, 3D CT/MR at 24 x 256 x 256) built
into a temporary tfds dataset. The teacher cache holds random full-size (64, 64, 256) float16
embeddings (the values do not matter for throughput; the bytes read do).
The step: the composed Rep-MedSAM model (RepViT-M1.0 encoder + prompt encoder + mask decoder,
``rep_medsam_jax/models/medsam_lite.py``) at 256 x 256, Dice + BCE + IoU-MSE loss, AdamW,
forward + backward + update, jitted; if the model cannot be built, the RepViT encoder alone
(forward + backward) is timed instead. Loader and step are timed separately: on 2 shared cores
they would compete for the same CPU when run together.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Imported while this folder is still on the path (it is dropped just below).
from record import add_out_argument, out_from_argv, recorded_output

# This script is named like the package it measures: drop its own folder from the import path,
# so that `import input_pipeline` finds the package, not this file.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from input_pipeline.augment import DISTILL_AUGMENT, FINETUNE_AUGMENT  # noqa: E402
from input_pipeline.loader import make_loader  # noqa: E402
from input_pipeline.phantoms import write_phantom_dataset  # noqa: E402
from input_pipeline.teacher_cache import Teacher, build_teacher_cache  # noqa: E402
from input_pipeline.tfds_builder import BuildOptions, build_dataset  # noqa: E402
from rep_medsam_jax.models.config import ViTConfig  # noqa: E402


def _quiet(_message: str) -> None:
    pass


def loader_throughput(dataset_dir: Path, *, batch_size: int, batches: int, workers: int,
                      augment, teacher_cache_dir: Path | None = None) -> float:
    """Examples per second over ``batches`` batches after two warm-up batches."""
    loader = make_loader(dataset_dir, "train", batch_size=batch_size, seed=0, augment=augment,
                         worker_count=workers, teacher_cache_dir=teacher_cache_dir)
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def host_cpu_per_example(dataset_dir: Path, *, batch_size: int, batches: int,
                         device_images: bool) -> tuple[float, int]:
    """(host CPU microseconds per example, bytes per example sent) of reading, augmenting and
    placing ``batches`` fine-tuning batches on the default device (after two warm-up ones)."""
    import jax  # noqa: PLC0415

    from rep_medsam_jax.training.loop import select_batch  # noqa: PLC0415

    loader = make_loader(dataset_dir, "train", batch_size=batch_size, seed=0,
                         augment=FINETUNE_AUGMENT, worker_count=0, device_images=device_images)
    iterator = iter(loader)

    def one() -> int:
        batch = select_batch(next(iterator))
        jax.block_until_ready(jax.device_put(batch))
        return sum(v.nbytes for v in batch.values())

    for _ in range(2):
        one()
    start = time.process_time()
    sent = sum(one() for _ in range(batches))
    seconds = time.process_time() - start
    return 1e6 * seconds / (batches * batch_size), sent // (batches * batch_size)


def device_finish_per_example(dataset_dir: Path, *, batch_size: int, repeats: int = 10) -> float:
    """Microseconds per example the device spends finishing uint8 images (normalisation +
    colour jitter, ``device_augment.finish_images`` jitted)."""
    import jax  # noqa: PLC0415

    from input_pipeline.device_augment import finish_images  # noqa: PLC0415

    loader = make_loader(dataset_dir, "train", batch_size=batch_size, seed=0,
                         augment=FINETUNE_AUGMENT, worker_count=0, device_images=True)
    batch = next(iter(loader))
    keys = ("image", "image_region", "jitter_order", "jitter_factors")
    device_batch = jax.device_put({k: batch[k] for k in keys})
    finish = jax.jit(finish_images)
    jax.block_until_ready(finish(device_batch))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(finish(device_batch))
    return 1e6 * (time.perf_counter() - start) / (repeats * batch_size)


def compare_host_cpu(dataset_dir: Path, batch_size: int, batches: int) -> dict:
    import json  # noqa: PLC0415

    import jax  # noqa: PLC0415

    before, before_bytes = host_cpu_per_example(dataset_dir, batch_size=batch_size,
                                                batches=batches, device_images=False)
    after, after_bytes = host_cpu_per_example(dataset_dir, batch_size=batch_size,
                                              batches=batches, device_images=True)
    device = device_finish_per_example(dataset_dir, batch_size=batch_size)
    platform = jax.devices()[0].platform
    print(f"host CPU per example, images finished on the host: {before:.0f} us "
          f"({before_bytes / 1024:.0f} KiB sent)")
    print(f"host CPU per example, images finished on the device: {after:.0f} us "
          f"({after_bytes / 1024:.0f} KiB sent)")
    print(f"ratio (host / device finishing): {before / after:.2f}x less host CPU per example; "
          f"the device ({platform}) spends {device:.0f} us per example finishing them")
    result = {"batch_size": batch_size, "batches": batches, "device": platform,
              "host_us_per_example_host_finish": round(before, 1),
              "host_us_per_example_device_finish": round(after, 1),
              "bytes_per_example_host_finish": before_bytes,
              "bytes_per_example_device_finish": after_bytes,
              "device_us_per_example_finish": round(device, 1),
              "ratio": round(before / after, 3)}
    out = Path(__file__).resolve().parent / "results" / "input_host_cpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def fake_teacher_cache(dataset_dir: Path, cache_dir: Path) -> None:
    """A cache in the real format with random (64, 64, 256) float16 embeddings: a 'teacher'
    with 64 x 64 inputs and patch 1 has the full-size grid, and its encode is replaced."""
    config = ViTConfig(name="benchmark_random", img_size=64, patch_size=1)
    teacher = Teacher(config, {}, "benchmark:random-embeddings")
    rng = np.random.default_rng(0)

    def encode(batch: dict) -> np.ndarray:
        return rng.standard_normal((len(batch["slice"]), 64, 64, 256)).astype(np.float16)

    build_teacher_cache(dataset_dir, "train", cache_dir, teacher, batch_size=16,
                        encode_fn=encode, log=_quiet)


def train_step_seconds_per_example(batch_size: int, repeats: int = 3) -> tuple[float, str, float]:
    """(seconds per example, what was timed, compile seconds) of a jitted training step."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((batch_size, 256, 256, 3), dtype=np.float32))
    masks = np.zeros((batch_size, 256, 256), np.float32)
    masks[:, 60:140, 80:200] = 1
    masks = jnp.asarray(masks)
    boxes = jnp.tile(jnp.array([[80.0, 60.0, 199.0, 139.0]]), (batch_size, 1))
    tx = optax.adamw(1e-4, weight_decay=0.01)
    try:
        from rep_medsam_jax.models.config import MODEL_PRESETS  # noqa: PLC0415
        from rep_medsam_jax.models.medsam_lite import build_model, init_variables  # noqa: PLC0415

        config = MODEL_PRESETS["rep_medsam"]
        model = build_model(config)
        variables = init_variables(config, jax.random.PRNGKey(0), batch=1)
        what = "composed Rep-MedSAM (RepViT-M1.0 + prompt encoder + mask decoder) train step"

        def loss_fn(params, batch_stats):
            (logits, iou, _), updated = model.apply(
                {"params": params, "batch_stats": batch_stats}, images, boxes, train=True,
                mutable=["batch_stats"])
            probs = jax.nn.sigmoid(logits)
            dice = 1 - (2 * jnp.sum(probs * masks, (1, 2)) + 1e-5) / (
                jnp.sum(probs ** 2, (1, 2)) + jnp.sum(masks, (1, 2)) + 1e-5)
            bce = optax.sigmoid_binary_cross_entropy(logits, masks).mean()
            target = jnp.sum((logits > 0) & (masks > 0), (1, 2)) / jnp.maximum(
                jnp.sum((logits > 0) | (masks > 0), (1, 2)), 1)
            iou_mse = jnp.mean((iou - jax.lax.stop_gradient(target)) ** 2)
            return dice.mean() ** 2 + bce ** 2 + iou_mse ** 2, updated["batch_stats"]
    except Exception as err:              # the composed model is not available: encoder only
        print(f"(composed model unavailable: {err}; timing the RepViT encoder instead)",
              file=sys.stderr)
        from rep_medsam_jax.models.config import REPVIT_VARIANTS  # noqa: PLC0415
        from rep_medsam_jax.models.repvit import RepViT, init_repvit  # noqa: PLC0415

        encoder = RepViT(REPVIT_VARIANTS["rep_medsam_m1_0"])
        variables = init_repvit(jax.random.PRNGKey(0), REPVIT_VARIANTS["rep_medsam_m1_0"])
        what = "RepViT-M1.0 encoder forward + backward (MSE to a random target)"
        target = jnp.zeros((batch_size, 64, 64, 256))

        def loss_fn(params, batch_stats):
            (embedding, _), updated = encoder.apply(
                {"params": params, "batch_stats": batch_stats}, images, train=True,
                mutable=["batch_stats"])
            return jnp.mean((embedding - target) ** 2), updated["batch_stats"]

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params,
                                                                                batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    start = time.perf_counter()
    params, batch_stats, opt_state, loss = jax.block_until_ready(
        step(params, batch_stats, opt_state))
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        params, batch_stats, opt_state, loss = jax.block_until_ready(
            step(params, batch_stats, opt_state))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch_size, what, compile_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, nargs=2, default=(12, 3), metavar=("N2D", "N3D"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 2))
    parser.add_argument("--step-batch", type=int, default=2)
    parser.add_argument("--skip-step", action="store_true")
    add_out_argument(parser, "input_pipeline")
    parser.add_argument("--host-cpu", action="store_true",
                        help="only compare host CPU per example, host vs device image finishing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_phantom_dataset(root / "cases", n2d=args.cases[0], n3d=args.cases[1], seed=0,
                              size_2d=256, shape_3d=(24, 256, 256))
        built = build_dataset(root / "cases", root / "data",
                              BuildOptions(validation_fraction=0.0), log=_quiet)
        examples = built.split_sizes["train"]
        print(f"dataset: {examples} training examples from {sum(args.cases)} phantom cases, "
              f"written and built in {time.perf_counter() - start:.1f} s")
        if args.host_cpu:
            compare_host_cpu(built.dataset_dir, args.batch_size, args.batches)
            return
        fake_teacher_cache(built.dataset_dir, root / "cache")

        rates = {}
        for workers in args.workers:
            rates[f"fine-tuning augmentation, {workers} worker(s)"] = loader_throughput(
                built.dataset_dir, batch_size=args.batch_size, batches=args.batches,
                workers=workers, augment=FINETUNE_AUGMENT)
            rates[f"distillation (flips + 64x64x256 fp16 teacher), {workers} worker(s)"] = \
                loader_throughput(built.dataset_dir, batch_size=args.batch_size,
                                  batches=args.batches, workers=workers,
                                  augment=DISTILL_AUGMENT, teacher_cache_dir=root / "cache")
    for name, rate in rates.items():
        print(f"loader, {name}: {rate:.1f} examples/s (batch {args.batch_size})")
    if args.skip_step:
        return
    seconds, what, compile_seconds = train_step_seconds_per_example(args.step_batch)
    print(f"train step: {what}, batch {args.step_batch}, 256x256: {seconds:.3f} s per example "
          f"({1 / seconds:.2f} examples/s; compile {compile_seconds:.1f} s)")
    slowest = min(rates.values())
    print(f"ratio: the slowest loader setting delivers {slowest * seconds:.1f}x the examples "
          f"per second the step consumes" + (" (loader is NOT the bottleneck)"
                                             if slowest * seconds > 1 else
                                             " (LOADER IS THE BOTTLENECK)"))


if __name__ == "__main__":
    with recorded_output(out_from_argv("input_pipeline")):
        main()
