"""Training throughput: images per second of ``distill_step`` and ``seg_step`` for the full-size
model (batch 16, 256 x 256), float32 vs bfloat16 compute, and a PyTorch step of the same maths.

    python benchmarks/train_step.py [--batch 16] [--size 256] [--steps 5] [--warmup 2]
        [--kinds distill seg] [--dtypes float32 bfloat16] [--torch-variants eager tuned]
        [--no-torch] [--no-jax] [--profile DIR] [--json FILE]

JAX side: ``training.steps`` jitted with the state donated, on the default backend (a GPU if
JAX has one), AdamW + the reference's percentile clipping; distillation from a cached (random)
teacher embedding with the heads frozen; segmentation with the reference's squared loss.
PyTorch side (if torch is installed): the reference model of the tests
(``tests/reference/medsam_lite_torch.py``: the RepViT of the Rep-MedSAM authors' repository +
segment-anything's prompt encoder and mask decoder) in train mode, the same losses, AdamW and
percentile clipping, on CUDA if torch has it, else the CPU; bfloat16 via ``torch.autocast``.
Two variants: "eager" (as the authors train) and "tuned" (channels_last memory format for
model and images, the image encoder, where nearly all the compute is, compiled with
``torch.compile``; with autocast in the bfloat16 rows), the fair baseline for a speed claim.

``--profile DIR``: after timing, each JAX row runs two more steps under ``jax.profiler.trace``
(a TensorBoard / Perfetto trace in DIR/<step>_<dtype>) and prints the ops that took the most
time per step, read from the trace. SAM 1.0's mask decoder repeats
every image embedding once per box; LiteMedSAM's training copy skips that when there is one box
per image, and so does the step here (see ``_one_box_per_image``).

Reports the first call's time (JAX: compilation included), the median seconds per step over
``--steps`` timed steps after ``--warmup`` untimed ones, and images per second (batch / median
step time).

Memory: the full model keeps about 3 GB of activations per 256 x 256 image for the backward
pass; at batch 16 XLA:CPU asks for one 46 GB buffer (the distillation step), more than a
laptop has: on a CPU use ``--batch 2``. On the CPU, XLA's depthwise convolutions are slow (see
benchmarks/encoder.py), so PyTorch's CPU step is several times faster; a GPU is the place to
train.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rep_medsam_jax.models.config import MODEL_PRESETS, REPVIT_VARIANTS  # noqa: E402
from rep_medsam_jax.models.medsam_lite import build_model, init_variables  # noqa: E402
from rep_medsam_jax.training import optim  # noqa: E402
from rep_medsam_jax.training import steps as steps_lib  # noqa: E402
from record import add_out_argument, resolve_out, write_json  # noqa: E402


def _batch(batch: int, size: int, grid: int, channels: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    masks = np.zeros((batch, size, size), np.uint8)
    boxes = np.zeros((batch, 4), np.int32)
    for i in range(batch):
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = x0 + rng.integers(size // 8, size // 2, 2)
        masks[i, y0:y1, x0:x1] = 1
        boxes[i] = (x0, y0, x1 - 1, y1 - 1)
    return {"image": rng.random((batch, size, size, 3), np.float32), "mask": masks, "box": boxes,
            "teacher_embedding": rng.normal(size=(batch, grid, grid, channels)).astype(
                np.float32)}


def _time_steps(run, state, steps: int, warmup: int) -> tuple[float, list[float], object]:
    started = time.perf_counter()
    state = run(state)
    compile_seconds = time.perf_counter() - started
    for _ in range(warmup):
        state = run(state)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state = run(state)
        times.append(time.perf_counter() - started)
    return compile_seconds, times, state


def bench_jax(kind: str, dtype: str, args, model, variables, batch) -> dict:
    trainable = ("image_encoder",) if kind == "distill" else optim.MODEL_PARTS
    config = optim.OptimConfig(learning_rate=1e-5, clip="percentile", trainable=trainable)
    tx = optim.make_optimizer(config, variables["params"])
    state = steps_lib.create_train_state(jax.tree.map(jnp.asarray, variables), tx,
                                         jax.random.PRNGKey(0))
    options = steps_lib.StepOptions(compute_dtype=dtype, trainable=trainable)
    step = steps_lib.jit_steps("distill" if kind == "distill" else "seg", model, tx,
                               options).train
    device_batch = jax.device_put({k: v for k, v in batch.items()
                                   if kind == "distill" or k != "teacher_embedding"})
    key = jax.random.PRNGKey(0)

    def run(current):
        current, metrics = step(current, device_batch, key)
        jax.block_until_ready(metrics["loss"])
        return current

    compile_seconds, times, state = _time_steps(run, state, args.steps, args.warmup)
    if args.profile:
        folder = Path(args.profile) / f"{kind}_{dtype}"
        with jax.profiler.trace(str(folder), create_perfetto_trace=True):
            for _ in range(PROFILE_STEPS):
                state = run(state)
        print_top_ops(folder, f"jax {kind} {dtype}", PROFILE_STEPS)
    return _row("jax", kind, dtype, str(jax.devices()[0].platform), compile_seconds, times,
                args.batch)


PROFILE_STEPS = 2
# Trace events that are the runtime or Python around the ops, not ops.
_NOT_OPS = ("PjitFunction", "PjRt", "ThreadPool", "Allocate", "Handle inputs", "Execute",
            "Await", "Thunk", "TransferTo", "BufferFromPyval")


def top_ops(folder: Path, count: int = 15) -> tuple[list[tuple[str, float]], float]:
    """([(op name, total microseconds)] largest first, total op microseconds) from the Perfetto
    trace jax.profiler wrote under ``folder`` (Python frames and runtime events left out)."""
    import collections  # noqa: PLC0415
    import gzip  # noqa: PLC0415

    paths = sorted(folder.glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {folder}")
    data = json.load(gzip.open(paths[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    python_threads = {e["tid"] for e in events if e.get("ph") == "M"
                      and e.get("name") == "thread_name"
                      and str(e.get("args", {}).get("name", "")).startswith("python")}
    totals: collections.Counter = collections.Counter()
    for event in events:
        name = str(event.get("name", ""))
        if (event.get("ph") != "X" or event.get("tid") in python_threads
                or name.startswith("$") or any(part in name for part in _NOT_OPS)):
            continue
        totals[name] += float(event.get("dur", 0.0))
    return totals.most_common(count), sum(totals.values())


def print_top_ops(folder: Path, label: str, steps: int) -> None:
    ops, total = top_ops(folder)
    print(f"\n{label}: top ops by time ({steps} profiled steps, trace in {folder})")
    for name, micros in ops:
        print(f"  {micros / steps / 1000:9.2f} ms/step {100 * micros / max(total, 1e-9):5.1f}%  "
              f"{name[:90]}")


def _row(framework, kind, dtype, device, compile_seconds, times, batch) -> dict:
    median = statistics.median(times)
    return {"framework": framework, "step": kind, "dtype": dtype, "device": device,
            "first_call_s": round(compile_seconds, 2), "step_s": round(median, 4),
            "images_per_s": round(batch / median, 2)}


@contextlib.contextmanager
def _one_box_per_image(modeling):
    """SAM 1.0's MaskDecoder repeats each image embedding once per box (N images x N boxes ->
    N^2 decodes); LiteMedSAM's training copy does not when the counts match. Make it so."""
    import torch

    decoder_module = sys.modules[modeling.MaskDecoder.__module__]

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def repeat_interleave(x, repeats, dim=0):
            return x if x.shape[dim] == repeats else torch.repeat_interleave(x, repeats, dim=dim)

    saved = decoder_module.torch
    decoder_module.torch = _Torch()
    try:
        yield
    finally:
        decoder_module.torch = saved


def bench_torch(kind: str, dtype: str, args, batch, tuned: bool = False) -> dict:
    import torch

    from tests.reference.medsam_lite_torch import MedSAMLiteTorch
    from tests.reference.sam_modeling import load_sam_modeling

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    rows = REPVIT_VARIANTS["rep_medsam_m1_0"].rows
    model = MedSAMLiteTorch(rows).to(device).train()
    if kind == "distill":
        parameters = list(model.image_encoder.parameters())
        for p in list(model.prompt_encoder.parameters()) + list(model.mask_decoder.parameters()):
            p.requires_grad_(False)
    else:
        parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.01)
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    if tuned:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        model.image_encoder = torch.compile(model.image_encoder)
    masks = torch.from_numpy(batch["mask"]).float()[:, None].to(device)
    boxes = torch.from_numpy(batch["box"]).float()[:, None, :].to(device)
    target = torch.from_numpy(batch["teacher_embedding"]).permute(0, 3, 1, 2).contiguous().to(
        device)
    history: list[float] = []
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    modeling = load_sam_modeling()

    def loss_fn():
        with autocast:
            embedding = model.image_encoder(images)
            if kind == "distill":
                return torch.nn.functional.mse_loss(embedding.float(), target)
            sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
            logits, iou = model.mask_decoder(image_embeddings=embedding,
                                             image_pe=model.prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse,
                                             dense_prompt_embeddings=dense,
                                             multimask_output=False)
        logits, iou = logits.float(), iou.float()
        probs = torch.sigmoid(logits)
        dice = 1 - (2 * (probs * masks).sum((2, 3)) + 1e-5) / (
            (probs ** 2).sum((2, 3)) + (masks ** 2).sum((2, 3)) + 1e-5)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
        with torch.no_grad():
            predicted = logits > 0
            truth = masks > 0
            iou_target = ((predicted & truth).sum((2, 3)).float()
                          / (predicted | truth).sum((2, 3)).float().clamp(min=1))
        iou_loss = torch.nn.functional.mse_loss(iou, iou_target)
        return dice.mean() ** 2 + bce ** 2 + iou_loss ** 2

    def run(_state):
        optimizer.zero_grad(set_to_none=True)
        with _one_box_per_image(modeling):
            loss = loss_fn()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(parameters, float("inf"))
        history.append(float(norm))
        torch.nn.utils.clip_grad_norm_(parameters, float(np.percentile(history, 90)))
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return None

    compile_seconds, times, _ = _time_steps(run, None, args.steps, args.warmup)
    return _row("torch tuned" if tuned else "torch", kind, dtype, device, compile_seconds,
                times, args.batch)


def print_table(rows: list[dict]) -> None:
    """The rows, with each JAX row's throughput as a multiple of the eager and the tuned PyTorch
    rows of the same step and dtype from this run (the baselines)."""
    torch_rate = {(r["step"], r["dtype"]): r["images_per_s"] for r in rows
                  if r["framework"] == "torch"}
    tuned_rate = {(r["step"], r["dtype"]): r["images_per_s"] for r in rows
                  if r["framework"] == "torch tuned"}
    print(f"\n{'framework':11} {'step':8} {'dtype':9} {'device':6} {'first s':>8} "
          f"{'step s':>8} {'img/s':>8} {'vs torch':>9} {'vs tuned':>9}")
    for row in rows:
        key = (row["step"], row["dtype"])
        # JAX and the tuned step against eager PyTorch; JAX against the tuned step.
        compared = [(torch_rate.get(key), row["framework"] != "torch"),
                    (tuned_rate.get(key), row["framework"] == "jax")]
        ratios = [f"{row['images_per_s'] / base:8.2f}x" if base and shown else f"{'':9}"
                  for base, shown in compared]
        print(f"{row['framework']:11} {row['step']:8} {row['dtype']:9} {row['device']:6} "
              f"{row['first_call_s']:8.1f} {row['step_s']:8.3f} {row['images_per_s']:8.2f} "
              f"{ratios[0]} {ratios[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--preset", default="rep_medsam", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=["distill", "seg"],
                        choices=["distill", "seg"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"])
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-variants", nargs="+", default=["eager", "tuned"],
                        choices=["eager", "tuned"])
    parser.add_argument("--profile", metavar="DIR",
                        help="trace two more steps of each JAX row and print the top ops")
    parser.add_argument("--no-jax", action="store_true")
    add_out_argument(parser, "train_step", ".json", flag="--json")
    args = parser.parse_args()

    import dataclasses

    config = MODEL_PRESETS[args.preset]
    if args.size != config.image_size:
        config = dataclasses.replace(config, image_size=args.size, embedding_size=args.size // 4)
    channels = REPVIT_VARIANTS[config.encoder_variant].neck_channels
    batch = _batch(args.batch, config.image_size, config.embedding_size, channels)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; model {args.preset} at "
          f"{config.image_size}px, batch {args.batch}", flush=True)
    rows = []
    run_torch = not args.no_torch and args.preset == "rep_medsam" and config.image_size == 256
    if run_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch not installed: no PyTorch reference step", flush=True)
            run_torch = False
    if not args.no_jax:
        model = build_model(config)
        variables = init_variables(config, 0)
    # JAX and PyTorch side by side, one (step, dtype) pair at a time.
    for kind in args.kinds:
        for dtype in args.dtypes:
            if not args.no_jax:
                rows.append(bench_jax(kind, dtype, args, model, variables, batch))
                print(json.dumps(rows[-1]), flush=True)
            for variant in args.torch_variants if run_torch else ():
                try:
                    rows.append(bench_torch(kind, dtype, args, batch, tuned=variant == "tuned"))
                except Exception as err:  # noqa: BLE001 (torch.compile needs a C++ toolchain)
                    print(f"torch {variant} {kind} {dtype} failed: {err}", flush=True)
                    continue
                print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    write_json(resolve_out(args.json, "train_step", ".json"), rows)


if __name__ == "__main__":
    main()
