"""Encoding a batch of slices: one onnxruntime session on every thread vs the batch split over
side-by-side sessions (what ``OnnxBackend.encode`` does for several images).

    python benchmarks/batch_encode.py EXPORT_DIR [--slices 8] [--chunk 4] [--repeats 5]

For each encoder file in EXPORT_DIR (fp32, and int8 when present), the slices go through
``--chunk`` images per call, as the 3D procedure sends them, (a) on the backend's main session
and (b) through ``OnnxBackend.encode``; runs interleaved, alternating which goes first. Prints
the median time per slice, the ratio (b) / (a) and the largest embedding difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rep_medsam_jax.predictor.onnx_backend import OnnxBackend  # noqa: E402
from record import add_out_argument, out_from_argv, recorded_output  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    add_out_argument(parser, "batch_encode")
    args = parser.parse_args()

    export = Path(args.export_dir)
    rng = np.random.default_rng(0)
    for name in ("encoder.onnx", "encoder_int8.onnx"):
        if not (export / name).is_file():
            continue
        backend = OnnxBackend.from_export_dir(export, encoder_file=name)
        size = backend.image_size
        slices = rng.random((args.slices, size, size, 3), dtype=np.float32)
        chunks = [slices[i:i + args.chunk] for i in range(0, args.slices, args.chunk)]

        def one_session():
            return np.concatenate([backend._encoder.run(None, {backend._encoder_input: c})[0]
                                   for c in chunks])

        def split():
            return np.concatenate([backend.encode(c) for c in chunks])

        runs = {"one session": one_session, "split": split}
        outputs = {label: fn() for label, fn in runs.items()}       # warm-up, sessions made
        times = {label: [] for label in runs}
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(runs)[::-1]
            for label in order:
                start = time.perf_counter()
                runs[label]()
                times[label].append((time.perf_counter() - start) / args.slices)
        base, other = (statistics.median(times[label]) for label in runs)
        diff = float(np.max(np.abs(outputs["split"] - outputs["one session"])))
        print(f"{name}: {args.slices} slices, {args.chunk} per call, {backend._threads} threads: "
              f"one session {1e3 * base:.1f} ms/slice, split {1e3 * other:.1f} ms/slice "
              f"({other / base:.3f}x), max |diff| {diff:.1e}")


if __name__ == "__main__":
    with recorded_output(out_from_argv("batch_encode")):
        main()
