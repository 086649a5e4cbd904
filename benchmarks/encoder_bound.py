"""How fast can an fp32 encoder run on this CPU at all? A lower bound, beside the measured ones.

The Rep-MedSAM encoder is convolutions: 31.1 GMAC at 256 x 256 (BatchNorm folded), counted here from
the exported graph. No fp32 implementation can run them faster than this machine's peak fp32
multiply-add rate, so ``conv FLOPs / peak rate`` bounds the encoder's latency from below, even
with every other operator free. The peak is estimated by the best rate seen here, which the
true peak can only exceed a little (on the 2-core Zen 4 development VM the best was 227
GFLOP/s, 96 % of 2 cores x 32 fp32 FLOP/cycle at 3.7 GHz). This script measures, in one run:

1. the rate of onnxruntime's fp32 matrix products (MLAS) for products shaped like the
   encoder's largest 1x1 convolutions and one large square product;
2. the exported encoder with the predictor's session options, profiled per operator: time in
   convolutions (and the rate they reach, by resolution and kind) and in everything else;
3. the folded PyTorch reference encoder and decoder (1 box), as in benchmarks/predict.py;

and prints the bound, at the best rate seen (a product, or a group of the encoder's own
convolutions of at least 1 GFLOP), as a fraction of PyTorch's encoder, against two
targets (fp32 encoder at or below 0.55x PyTorch; 3D cases at or below 0.3x the reference
pipeline, whose time per slice is at least PyTorch's encoder + one decoder call).

    python benchmarks/encoder_bound.py [--workdir work_dirs/bench_predict] [--repeats 10]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from predict import _python, micro_torch, prepare  # noqa: E402
from record import add_out_argument, out_from_argv, recorded_output  # noqa: E402

# (M, K, N): the encoder's 1x1 convolutions at 64 x 64 as products (4096 pixels), the stage-1
# ones at 256 x 256, and a large square product (MLAS's best case).
PRODUCT_SHAPES = ((4096, 448, 896), (4096, 896, 448), (4096, 224, 448), (65536, 56, 112),
                  (2048, 2048, 2048))


def conv_macs(encoder_path: Path) -> list[dict]:
    """Every Conv of the exported encoder, in graph order: its kind, output size and MACs at
    batch 1 (from ONNX shape inference; grouped convolutions counted per group)."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(encoder_path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.output]}
    weights = {w.name: list(w.dims) for w in model.graph.initializer}
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        out_channels, in_per_group, kh, kw = weights[node.input[1]]
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        _, _, height, width = shapes[node.output[0]]
        kind = "depthwise" if groups > 1 else f"{kh}x{kw}"
        convs.append({"kind": kind, "size": height, "weight": [out_channels, in_per_group, kh, kw],
                      "macs": out_channels * in_per_group * kh * kw * height * width})
    return convs


def product_rates(repeats: int) -> dict:
    """GFLOP/s of onnxruntime fp32 MatMul for each of PRODUCT_SHAPES (fresh process)."""
    return _python(f"""
        import json, numpy as np, onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from rep_medsam_jax.predictor.onnx_backend import session_options
        out = {{}}
        for m, k, n in {PRODUCT_SHAPES!r}:
            rng = np.random.default_rng(0)
            weight = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"])], "product",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [weight])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            s = ort.InferenceSession(model.SerializeToString(), session_options())
            x = rng.standard_normal((m, k), dtype=np.float32)
            seconds = median(lambda: s.run(None, {{"x": x}}))
            out[f"{{m}}x{{k}}x{{n}}"] = 2 * m * k * n / seconds / 1e9
        print(json.dumps(out))
    """, repeats)


def profile_encoder(encoder_path: Path, repeats: int, profile_dir: str) -> dict:
    """The encoder's median latency, and from onnxruntime's profiler (fresh process) the mean
    time of each Conv node with its weight's shape (graph order of the optimised model) and
    of all other nodes together."""
    return _python(f"""
        import collections, json, numpy as np, onnx, onnxruntime as ort
        from rep_medsam_jax.predictor.onnx_backend import session_options
        x = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)
        plain = ort.InferenceSession("{encoder_path}", session_options())
        latency = median(lambda: plain.run(None, {{"images": x}}))
        options = session_options()
        options.enable_profiling = True
        options.profile_file_prefix = "{profile_dir}/encoder"
        options.optimized_model_filepath = "{profile_dir}/optimised.onnx"
        s = ort.InferenceSession("{encoder_path}", options)
        for _ in range(REPEATS + 1):
            s.run(None, {{"images": x}})
        events = json.load(open(s.end_profiling()))
        total, ops, count = collections.Counter(), {{}}, collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                name = e["name"][:-len("_kernel_time")]
                total[name] += e["dur"]; ops[name] = e["args"]["op_name"]; count[name] += 1
        optimised = onnx.load("{profile_dir}/optimised.onnx").graph
        weights = {{w.name: list(w.dims) for w in optimised.initializer}}
        mean = {{n: total[n] / count[n] / 1e6 for n in total}}     # seconds per run
        convs = [{{"seconds": mean[n.name], "weight": weights.get(n.input[1])}}
                 for n in optimised.node if n.name in mean and ops[n.name] == "Conv"]
        other = sum(v for n, v in mean.items() if ops[n] != "Conv")
        print(json.dumps({{"latency": latency, "convs": convs, "other": other}}))
    """.replace("REPEATS", str(repeats)), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "work_dirs" / "bench_predict"))
    parser.add_argument("--repeats", type=int, default=10)
    add_out_argument(parser, "encoder_bound")
    args = parser.parse_args()
    paths = prepare(Path(args.workdir))
    encoder = paths["export"] / "encoder.onnx"

    convs = conv_macs(encoder)
    conv_flops = 2 * sum(c["macs"] for c in convs)
    rates = product_rates(args.repeats)
    with tempfile.TemporaryDirectory() as profile_dir:
        ours = profile_encoder(encoder, args.repeats, profile_dir)
    torch_times = micro_torch(paths["checkpoint"], args.repeats)

    print(f"encoder convolutions: {conv_flops / 2e9:.2f} GMAC ({len(convs)} Conv nodes)")
    print("\n== onnxruntime fp32 matrix products (GFLOP/s) ==")
    for shape, rate in rates.items():
        print(f"  {shape:>18s}  {rate:6.1f}")
    print("\n== exported encoder, onnxruntime fp32, batch 1 ==")
    profiled_convs = ours["convs"]
    if len(profiled_convs) != len(convs):
        raise SystemExit(f"profile has {len(profiled_convs)} Conv nodes, graph {len(convs)}")
    # Pair them in graph order, checked by shape: the blocked layout pads the output channels
    # to its block (at most 16) and keeps the kernel.
    for conv, profiled in zip(convs, profiled_convs):
        padded = profiled["weight"]
        if (padded is None or padded[2:] != conv["weight"][2:]
                or not 0 <= padded[0] - conv["weight"][0] < 16):
            raise SystemExit(f"profiled conv weight {padded} does not pair with {conv['weight']}")
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for conv, profiled in zip(convs, profiled_convs):
        key = (f"{conv['size']}x{conv['size']} {conv['kind']}" if conv["size"] > 1
               else "squeeze-excite gates")
        groups[key][0] += profiled["seconds"]
        groups[key][1] += 2 * conv["macs"]
    print(f"  {'convolutions':22s} {'ms':>7s} {'GFLOP':>7s} {'GFLOP/s':>8s}")
    for key, (seconds, flops) in groups.items():
        print(f"  {key:22s} {seconds * 1e3:7.1f} {flops / 1e9:7.2f} {flops / seconds / 1e9:8.1f}")
    conv_time = sum(p["seconds"] for p in profiled_convs)
    print(f"  {'all convolutions':22s} {conv_time * 1e3:7.1f} {conv_flops / 1e9:7.2f} "
          f"{conv_flops / conv_time / 1e9:8.1f}")
    print(f"  other operators        {ours['other'] * 1e3:7.1f}")
    print(f"  latency (unprofiled)   {ours['latency'] * 1e3:7.1f} ms")

    # The best rate seen on this machine: a product, or a group of the encoder's own
    # convolutions (onnxruntime's blocked-layout convolutions can beat its MatMul).
    seen = {f"MatMul {shape}": rate * 1e9 for shape, rate in rates.items()}
    seen.update({f"encoder {key}": flops / seconds for key, (seconds, flops) in groups.items()
                 if flops >= 1e9})
    best_name, best = max(seen.items(), key=lambda item: item[1])
    bound = conv_flops / best

    reference = torch_times["encoder"]
    per_slice = torch_times["encoder"] + torch_times["decoder_1"]
    print("\n== bound ==")
    print(f"PyTorch folded encoder            {reference * 1e3:7.1f} ms   1.00x")
    print(f"onnxruntime fp32 (measured)       {ours['latency'] * 1e3:7.1f} ms   "
          f"{ours['latency'] / reference:.2f}x")
    print(f"convolutions at the best rate     {bound * 1e3:7.1f} ms   {bound / reference:.2f}x"
          f"   (lower bound for any fp32 encoder on this machine; best rate "
          f"{best / 1e9:.0f} GFLOP/s, {best_name})")
    target = 0.55 * reference
    print(f"target 0.55x PyTorch              {target * 1e3:7.1f} ms: needs the convolutions at "
          f"{conv_flops / target / 1e9:.0f} GFLOP/s with nothing else, "
          f"{conv_flops / target / best:.0%} of the best rate")
    print(f"3D, per slice: reference >= PyTorch encoder + 1 decoder call = {per_slice * 1e3:.1f} "
          f"ms; the fp32 bound is {bound / per_slice:.2f}x of it (target 0.3x; process start, "
          f"which the reference pays more of, is left out)")


if __name__ == "__main__":
    with recorded_output(out_from_argv("encoder_bound")):
        main()
