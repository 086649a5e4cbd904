"""Latency of the RepViT image encoder: training form (unfused, BN in inference mode) vs deploy
form (BN folded), jitted, on the default JAX backend (the CPU here).

    python benchmarks/encoder.py [--variant rep_medsam_m1_0] [--repeats 10] [--size 256]

Both forms run in the same process with the same random input; repeats alternate between the
two so that load from other processes affects both alike. Reports the median of ``--repeats``
timed runs after ``--warmup`` untimed ones, the ratio, compile times and parameter counts.

Folding gains little under XLA on a CPU: XLA already fuses inference-mode BatchNorm into the
neighbouring elementwise work, and the time is dominated by depthwise convolutions, which
XLA:CPU runs slowly (a 3x3 depthwise conv on 1x256x256x56 took 160 ms, vs 6 ms for the same
sum written as nine shifted multiply-adds). ONNX Runtime is the fast CPU path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from rep_medsam_jax.models.config import REPVIT_VARIANTS
from rep_medsam_jax.models.folding import fold
from rep_medsam_jax.models.repvit import RepViT, count_params, init_repvit
from record import add_out_argument, out_from_argv, recorded_output


def _randomize_batchnorm(variables: dict, seed: int) -> dict:
    """Non-trivial BN weights and running statistics. PyTorch's init leaves the last BN of each
    channel mixer at weight 0, which zeroes the transition block and makes the embedding
    independent of the input; the output comparisons below would then prove nothing."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [p.key for p in path]
        if keys[-1] == "mean":
            return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
        if keys[-1] == "var" or (keys[-2] == "bn" and keys[-1] == "scale"):
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, dict(variables))


def _embedding_fn(model: RepViT):
    # Only the embedding leaves the jit, so the feature dict costs nothing.
    return jax.jit(lambda variables, x: model.apply(variables, x)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="rep_medsam_m1_0", choices=sorted(REPVIT_VARIANTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    add_out_argument(parser, "encoder")
    args = parser.parse_args()

    config = REPVIT_VARIANTS[args.variant]
    unfused = _randomize_batchnorm(init_repvit(0, config), seed=1)
    folded = fold(unfused, config)
    x = jax.random.uniform(jax.random.key(2), (args.batch, args.size, args.size, 3))
    forms = {"unfused": (_embedding_fn(RepViT(config)), unfused),
             "folded": (_embedding_fn(RepViT(config, deploy=True)), folded)}

    print(f"variant {args.variant}, input {tuple(x.shape)}, backend {jax.default_backend()} "
          f"({jax.devices()[0].device_kind})")
    print(f"parameters: unfused {count_params(unfused):,} (+ BN running stats), "
          f"folded {count_params(folded):,}")

    outputs = {}
    for name, (fn, variables) in forms.items():
        start = time.perf_counter()
        outputs[name] = np.asarray(jax.block_until_ready(fn(variables, x)))
        print(f"{name}: first call (compile + run) {time.perf_counter() - start:.2f} s")
    (base_name, baseline), *others = outputs.items()
    print(f"output max |value| {np.abs(baseline).max():.2f}")
    for name, output in others:
        print(f"max |{name} - {base_name}| = {np.abs(output - baseline).max():.2e}")

    timings: dict[str, list[float]] = {name: [] for name in forms}
    for i in range(args.warmup + args.repeats):
        for name, (fn, variables) in forms.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(variables, x))
            if i >= args.warmup:
                timings[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in timings.items()}
    for name, median in medians.items():
        spread = (min(timings[name]) * 1e3, max(timings[name]) * 1e3)
        print(f"{name}: median {median:.1f} ms over {args.repeats} runs "
              f"(min {spread[0]:.1f}, max {spread[1]:.1f})")
    print(f"speed-up from folding: {medians['unfused'] / medians['folded']:.2f}x")


if __name__ == "__main__":
    with recorded_output(out_from_argv("encoder")):
        main()
