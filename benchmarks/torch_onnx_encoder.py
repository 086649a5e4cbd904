"""Our exported encoder against the PyTorch user's own ONNX path, side by side.

A PyTorch user who wants onnxruntime exports the authors' folded encoder with torch.onnx.
This script builds that peer from the same weights: the folded PyTorch reference encoder
(tests/reference) exported with ``torch.onnx.export`` (the TorchScript exporter, opset 17, constant folding on, as a PyTorch
user would), and runs it in onnxruntime with the predictor's session options, interleaved with
our ``encoder.onnx`` (and ``encoder_int8.onnx`` when present) and with PyTorch itself, in one
process:

    python benchmarks/torch_onnx_encoder.py [--workdir work_dirs/bench_predict] [--rounds 15]

Prints the medians, each graph's median of per-round ratios against PyTorch and against the
torch export, and the largest difference between the torch export's embedding and ours (the
same weights, so the same embedding up to float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from predict import prepare  # noqa: E402
from record import add_out_argument, out_from_argv, recorded_output  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "work_dirs" / "bench_predict"))
    parser.add_argument("--rounds", type=int, default=15)
    add_out_argument(parser, "torch_onnx_encoder")
    args = parser.parse_args()
    paths = prepare(Path(args.workdir))

    import onnxruntime as ort
    import torch

    from rep_medsam_jax.models.config import REPVIT_VARIANTS
    from rep_medsam_jax.predictor.onnx_backend import PROVIDERS, session_options
    from tests.reference.medsam_lite_torch import MedSAMLiteTorch, fused_copy

    model = MedSAMLiteTorch(REPVIT_VARIANTS["rep_medsam_m1_0"].rows)
    model.load_state_dict(torch.load(paths["checkpoint"]))
    encoder = fused_copy(model.eval()).image_encoder
    image = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)
    nchw = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))

    with tempfile.TemporaryDirectory() as scratch:
        torch_onnx = Path(scratch) / "torch_encoder.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # the TorchScript exporter's deprecation notice
            torch.onnx.export(encoder, (nchw,), str(torch_onnx), dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["embedding"])
        sessions = {"torch.onnx export": (ort.InferenceSession(str(torch_onnx), session_options(),
                                                               providers=PROVIDERS),
                                          {"image": nchw.numpy()})}
    for name in ("encoder.onnx", "encoder_int8.onnx"):
        path = paths["export"] / name
        if path.exists():
            sessions[f"ours {name}"] = (ort.InferenceSession(str(path), session_options(),
                                                             providers=PROVIDERS),
                                        {"images": image})

    with torch.no_grad():
        want = encoder(nchw).numpy().transpose(0, 2, 3, 1)
        runs = {"PyTorch folded": lambda: encoder(nchw)}
    for name, (session, feeds) in sessions.items():
        runs[name] = (lambda s=session, f=feeds: s.run(None, f))
    for run in runs.values():      # warm up every path once
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.rounds):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in order:
            with torch.no_grad():
                times[name].append(_timed(runs[name]))

    def paired(name: str, baseline: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[baseline]))

    print(f"encoder, 256x256, batch 1: {args.rounds} interleaved rounds, median; ratios are "
          f"medians of the per-round ratios")
    print(f"{'':24s} {'median':>9s}  {'vs PyTorch':>10s}  {'vs torch.onnx':>13s}")
    for name in runs:
        line = f"{name:24s} {1e3 * statistics.median(times[name]):7.1f} ms  "
        line += f"{paired(name, 'PyTorch folded'):9.2f}x  "
        line += f"{paired(name, 'torch.onnx export'):12.2f}x"
        print(line)
    torch_embedding = sessions["torch.onnx export"][0].run(None, {"image": nchw.numpy()})[0]
    ours = sessions["ours encoder.onnx"][0].run(None, {"images": image})[0]
    scale = float(np.abs(want).max())
    print(f"max abs difference from PyTorch's embedding (max |value| {scale:.2f}): "
          f"torch.onnx {np.abs(torch_embedding.transpose(0, 2, 3, 1) - want).max():.2e}, "
          f"ours fp32 {np.abs(ours - want).max():.2e}")


if __name__ == "__main__":
    with recorded_output(out_from_argv("torch_onnx_encoder")):
        main()
