"""What the exporter's encoder-graph rewrites buy in onnxruntime: jax2onnx's graph as written,
after dropping the broadcast Expands, and after the squeeze-excite gate rewrite, side by side.

    python benchmarks/encoder_rewrites.py MODEL_DIR [--repeats 9] [--batch 1 4]

All three graphs come from one export of MODEL_DIR (folded as ``rep-medsam export`` folds it)
and run with the predictor's session options; runs are interleaved, rotating which graph goes
first, so that load from other processes hits all alike. Prints per batch size the median
latency per image, the ratio to jax2onnx's graph, the largest output difference from it, and
how many re-layout nodes (ReorderInput / ReorderOutput: a pass over a tensor each, to or from
onnxruntime's channel-blocked layout) onnxruntime's optimiser left in each graph.
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rep_medsam_jax.export import graph_passes, onnx_export  # noqa: E402
from rep_medsam_jax.model_dir import load_model_dir  # noqa: E402
from rep_medsam_jax.models.deploy import deployed_functions  # noqa: E402
from rep_medsam_jax.predictor.onnx_backend import session_options  # noqa: E402
from record import add_out_argument, out_from_argv, recorded_output  # noqa: E402


def graphs(model_dir: str) -> dict:
    config, encode, _ = deployed_functions(*load_model_dir(model_dir))
    size = config.image_size
    raw = onnx_export.encoder_to_onnx(encode, size)
    no_expand = copy.deepcopy(raw)
    dropped = graph_passes.drop_broadcast_expands(no_expand)
    blocked = copy.deepcopy(no_expand)
    gates = graph_passes.squeeze_excite_blocked(blocked)
    print(f"{dropped} broadcast Expands dropped, {gates} squeeze-excite gates rewritten")
    return {"jax2onnx": raw, "expands dropped": no_expand, "gates blocked": blocked}, size


def relayouts(model, scratch: Path) -> int:
    import onnx
    import onnxruntime as ort

    options = session_options()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(scratch / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath)
                              .graph.node)
    return ops["ReorderInput"] + ops["ReorderOutput"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    add_out_argument(parser, "encoder_rewrites")
    args = parser.parse_args()

    import onnxruntime as ort

    models, size = graphs(args.model_dir)
    names = list(models)
    with tempfile.TemporaryDirectory() as scratch:
        counts = {name: relayouts(model, Path(scratch)) for name, model in models.items()}
    sessions = {name: ort.InferenceSession(model.SerializeToString(), session_options(),
                                           providers=["CPUExecutionProvider"])
                for name, model in models.items()}
    rng = np.random.default_rng(0)
    for batch in args.batch:
        images = rng.random((batch, size, size, 3), dtype=np.float32)
        outputs = {name: s.run(None, {"images": images})[0] for name, s in sessions.items()}
        times = {name: [] for name in names}
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for name in order:
                start = time.perf_counter()
                sessions[name].run(None, {"images": images})
                times[name].append((time.perf_counter() - start) / batch)
        base = statistics.median(times[names[0]])
        print(f"batch {batch}, medians of {args.repeats} interleaved runs, per image:")
        for name in names:
            median = statistics.median(times[name])
            diff = float(np.max(np.abs(outputs[name] - outputs[names[0]])))
            print(f"  {name:16s} {1e3 * median:7.1f} ms  {median / base:5.3f}x  "
                  f"max |diff| {diff:.1e}  re-layout nodes {counts[name]}")


if __name__ == "__main__":
    with recorded_output(out_from_argv("encoder_rewrites")):
        main()
