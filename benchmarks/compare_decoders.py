"""Two ONNX decoder exports side by side: latency (interleaved medians) and output difference.

    python benchmarks/compare_decoders.py OLD_EXPORT_DIR NEW_EXPORT_DIR [--repeats 7]

Feeds both ``decoder.onnx`` files the same random embedding and 1 / 6 / 16 boxes, alternating
which runs first, and prints each median, the ratio new / old, the largest output difference
and the number of Einsum nodes in each graph (onnxruntime runs Einsum slowly on the CPU).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rep_medsam_jax.predictor.onnx_backend import session_options  # noqa: E402
from record import add_out_argument, out_from_argv, recorded_output  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--repeats", type=int, default=7)
    add_out_argument(parser, "compare_decoders")
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort

    sessions = {}
    for name in ("old", "new"):
        path = Path(getattr(args, name)) / "decoder.onnx"
        ops = collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)
        print(f"{name}: {path} ({ops['Einsum']} Einsum, {ops['MatMul']} MatMul nodes)")
        sessions[name] = ort.InferenceSession(str(path), session_options())
    inputs = sessions["old"].get_inputs()
    size = inputs[0].shape[1]
    channels = inputs[0].shape[3]
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(1, size, size, channels)).astype(np.float32)
    frame = 4 * size
    for count in (1, 6, 16):
        corner = rng.uniform(0, frame / 2, (count, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(8, frame / 2, (count, 2))], 1)
        feeds = {inputs[0].name: embedding, inputs[1].name: boxes.astype(np.float32)}
        outputs = {name: session.run(None, feeds) for name, session in sessions.items()}
        difference = max(float(np.abs(a - b).max())
                         for a, b in zip(outputs["old"], outputs["new"]))
        times = {"old": [], "new": []}
        for repeat in range(args.repeats):
            order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
            for name in order:
                started = time.perf_counter()
                sessions[name].run(None, feeds)
                times[name].append(time.perf_counter() - started)
        old, new = (statistics.median(times[name]) for name in ("old", "new"))
        print(f"{count:2d} boxes: old {old * 1e3:8.1f} ms  new {new * 1e3:8.1f} ms  "
              f"new/old {new / old:.2f}x  max output difference {difference:.1e}")


if __name__ == "__main__":
    with recorded_output(out_from_argv("compare_decoders")):
        main()
