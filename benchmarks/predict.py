"""CPU inference benchmark: our ONNX path vs the PyTorch reference, same weights, one run.

Prints, with ratios against the PyTorch reference measured in the same run:
1. encoder latency at 256 x 256, batch 1: onnxruntime fp32 and int8 vs the folded PyTorch
   encoder;
2. decoder latency per box: 1 box, and 16 boxes batched, vs the PyTorch decoder (16 looped and
   16 batched);
3. whole-case wall time (process start to output written) for cases shaped like the paper's
   Table 6, one process per case as the challenge timed it: the PyTorch reference, ours (fp32)
   and ours with ``--int8``.

Each timing runs in a fresh process; onnxruntime never shares a process with JAX or torch.

    python benchmarks/predict.py [--workdir DIR] [--repeats 10] [--micro-rounds 3]
                                 [--case-repeats 1] [--cases NAME ...] [--original-script]

On a shared machine the load changes between runs: the encoder / decoder timings run in
``--micro-rounds`` pairs of processes (onnxruntime, PyTorch; alternating which goes first), and
``--case-repeats N`` runs each whole case N times, rotating which pipeline goes first; both
report medians and the median of the paired ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from record import add_out_argument, out_from_argv, recorded_output

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # name: (kind, shape, number of boxes)
    "2DBox_small_256x256": ("2d", (256, 256), 1),
    "2DBox_mid_480x560": ("2d", (480, 560), 1),
    "2DBox_large_1536x2040": ("2d", (1536, 2040), 19),
    "3DBox_CT_64x512x512": ("3d", (64, 512, 512), 1),
    "3DBox_MR_64x290x320": ("3d", (64, 290, 320), 6),
}


# Defined in every timing subprocess: the median of n timed calls after one untimed call.
_MEDIAN = """
import statistics, time
def median(fn, n=REPEATS):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
"""


def _python(code: str, repeats: int) -> dict:
    """Run ``code`` in a fresh interpreter, after defining ``median(fn, n=repeats)``; the code
    prints one JSON line last."""
    source = _MEDIAN.replace("REPEATS", str(repeats)) + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", source], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare(workdir: Path) -> dict[str, Path]:
    """A random full-size PyTorch Rep-MedSAM checkpoint, converted and exported (fp32 + int8)."""
    paths = {"checkpoint": workdir / "rep_medsam.pth", "model": workdir / "model",
             "export": workdir / "export"}
    if not paths["checkpoint"].exists():
        import torch

        sys.path.insert(0, str(ROOT))
        from rep_medsam_jax.models.config import REPVIT_VARIANTS
        from tests.reference.medsam_lite_torch import build_reference_model

        model = build_reference_model(REPVIT_VARIANTS["rep_medsam_m1_0"].rows, seed=0)
        torch.save(model.state_dict(), paths["checkpoint"])
    if not paths["model"].exists():
        subprocess.run([sys.executable, "-m", "rep_medsam_jax.cli", "convert", "--from",
                        "rep-medsam", str(paths["checkpoint"]), "-o", str(paths["model"])],
                       check=True, cwd=ROOT)
    if not paths["export"].exists():
        subprocess.run([sys.executable, "-m", "rep_medsam_jax.cli", "export",
                        str(paths["model"]), "-o", str(paths["export"]), "--int8"],
                       check=True, cwd=ROOT)
    return paths


def make_cases(workdir: Path) -> dict[str, Path]:
    """One input folder per case (phantom content at the Table-6 shapes)."""
    sys.path.insert(0, str(ROOT))
    from input_pipeline.phantoms import make_case_2d, make_case_3d

    folders = {}
    rng = np.random.default_rng(0)
    for name, (kind, shape, n_boxes) in CASES.items():
        folder = workdir / "cases" / name
        folders[name] = folder
        if (folder / f"{name}.npz").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "2d":
            image, _, boxes = make_case_2d(rng, "Microscopy" if n_boxes > 1 else "Endoscopy",
                                           shape)
            while len(boxes) < n_boxes:        # pad to the box count with copies
                boxes = np.concatenate([boxes, boxes])
            np.savez(folder / f"{name}.npz", imgs=image, boxes=boxes[:n_boxes])
        else:
            volume, _, boxes, spacing = make_case_3d(rng, "CT", shape)
            while len(boxes) < n_boxes:
                boxes = np.concatenate([boxes, boxes])
            boxes = boxes[:n_boxes].copy()
            if n_boxes == 1:                   # one box over 33 slices, as in the paper
                boxes[0, 2], boxes[0, 5] = 15, 47
            np.savez(folder / f"{name}.npz", imgs=volume, boxes=boxes, spacing=spacing)
    return folders


def micro_onnx(export: Path, repeats: int) -> dict:
    return _python(f"""
        import json, numpy as np, onnxruntime as ort
        from rep_medsam_jax.predictor.onnx_backend import session_options
        x = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)
        out = {{}}
        for name in ("encoder.onnx", "encoder_int8.onnx"):
            s = ort.InferenceSession("{export}/" + name, session_options())
            out[name] = median(lambda: s.run(None, {{"images": x}}))
        s = ort.InferenceSession("{export}/encoder.onnx", session_options())
        emb = s.run(None, {{"images": x}})[0]
        d = ort.InferenceSession("{export}/decoder.onnx", session_options())
        for n in (1, 16):
            boxes = np.tile(np.array([[30, 40, 200, 180]], np.float32), (n, 1))
            out[f"decoder_{{n}}"] = median(lambda: d.run(None, {{"embedding": emb, "boxes": boxes}}))
        print(json.dumps(out))
    """, repeats)


def micro_openvino(export: Path, repeats: int) -> dict:
    return _python(f"""
        import json, numpy as np
        from rep_medsam_jax.predictor.openvino_backend import OpenVinoBackend
        x = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)
        out = {{}}
        for name in ("encoder.onnx", "encoder_int8.onnx"):
            b = OpenVinoBackend("{export}", encoder_file=name)
            out[name] = median(lambda: b.encode(x))
        emb = b.encode(x)
        for n in (1, 16):
            boxes = np.tile(np.array([[30, 40, 200, 180]], np.float32), (n, 1))
            out[f"decoder_{{n}}"] = median(lambda: b.decode(emb, boxes))
        print(json.dumps(out))
    """, repeats)


def micro_torch(checkpoint: Path, repeats: int) -> dict:
    return _python(f"""
        import json, numpy as np, torch
        from rep_medsam_jax.models.config import REPVIT_VARIANTS
        from tests.reference.medsam_lite_torch import MedSAMLiteTorch, fused_copy
        m = MedSAMLiteTorch(REPVIT_VARIANTS["rep_medsam_m1_0"].rows)
        m.load_state_dict(torch.load("{checkpoint}"))
        m = fused_copy(m.eval())
        x = torch.rand(1, 3, 256, 256)
        out = {{}}
        with torch.no_grad():
            out["encoder"] = median(lambda: m.image_encoder(x))
            emb = m.image_encoder(x)
            pe = m.prompt_encoder.get_dense_pe()
            def decode(n):
                boxes = torch.tensor([[30., 40., 200., 180.]]).repeat(n, 1)
                s, d = m.prompt_encoder(points=None, boxes=boxes, masks=None)
                return m.mask_decoder(image_embeddings=emb, image_pe=pe,
                                      sparse_prompt_embeddings=s, dense_prompt_embeddings=d,
                                      multimask_output=False)
            out["decoder_1"] = median(lambda: decode(1))
            out["decoder_16_looped"] = median(lambda: [decode(1) for _ in range(16)], 3)
            out["decoder_16_batched"] = median(lambda: decode(16), 3)
        print(json.dumps(out))
    """, repeats)


def whole_case(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "work_dirs" / "bench_predict"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--micro-rounds", type=int, default=3,
                        help="encoder/decoder micro-benchmarks: rounds of one onnxruntime and "
                             "one PyTorch process, alternating which goes first; ratios are "
                             "medians of the per-round ratios")
    parser.add_argument("--case-repeats", type=int, default=1,
                        help="whole-case runs per pipeline, rotating which goes first")
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="subset of cases")
    parser.add_argument("--original-script", action="store_true",
                        help="3D cases with several boxes also through the original "
                             "(paper-timed) reference script, which encodes each slice again "
                             "for every box")
    add_out_argument(parser, "predict")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir)
    folders = make_cases(workdir)
    from rep_medsam_jax.export.quantize import label_agreement
    meta = json.loads((paths["export"] / "export.json").read_text())

    print(f"machine: {os.cpu_count()} cores; weights: random full-size rep_medsam_m1_0")
    rounds: dict[str, list[dict]] = {"ours": [], "ref": []}
    for round_index in range(args.micro_rounds):
        # The machine's speed drifts: pair each onnxruntime process with a PyTorch one.
        for which in (("ours", "ref") if round_index % 2 == 0 else ("ref", "ours")):
            rounds[which].append(micro_onnx(paths["export"], args.repeats) if which == "ours"
                                 else micro_torch(paths["checkpoint"], args.repeats))
    ours, ref = ({key: float(np.median([r[key] for r in rounds[which]]))
                  for key in rounds[which][0]}
                 for which in ("ours", "ref"))

    def micro_ratio(our_key: str, ref_key: str) -> float:
        """Median over the rounds of ours / PyTorch measured in the same round."""
        return float(np.median([o[our_key] / r[ref_key]
                                for o, r in zip(rounds["ours"], rounds["ref"])]))

    print(f"\n== encoder, 256x256, batch 1 (median of {args.micro_rounds} rounds; ratio: "
          "median of the per-round ratios) ==")
    print(f"PyTorch folded      {ref['encoder'] * 1e3:8.1f} ms   1.00x")
    for name, label in (("encoder.onnx", "onnxruntime fp32"), ("encoder_int8.onnx",
                                                              "onnxruntime int8")):
        print(f"{label:19s} {ours[name] * 1e3:8.1f} ms   {micro_ratio(name, 'encoder'):.2f}x"
              "   rounds " + " ".join(f"{o[name] / r['encoder']:.2f}"
                                      for o, r in zip(rounds["ours"], rounds["ref"])))
    print(f"int8 mask DSC vs fp32 on phantom cases: {meta['int8']['mask_dsc_int8_vs_fp32']:.4f}")
    print("\n== prompt encoder + decoder (median) ==")
    print(f"PyTorch 1 box           {ref['decoder_1'] * 1e3:8.1f} ms")
    print(f"PyTorch 16 looped       {ref['decoder_16_looped'] * 1e3:8.1f} ms "
          f"({ref['decoder_16_looped'] / 16 * 1e3:.1f} ms/box)")
    print(f"PyTorch 16 batched      {ref['decoder_16_batched'] * 1e3:8.1f} ms "
          f"({ref['decoder_16_batched'] / 16 * 1e3:.1f} ms/box)")
    print(f"ours 1 box              {ours['decoder_1'] * 1e3:8.1f} ms   "
          f"{micro_ratio('decoder_1', 'decoder_1'):.2f}x PyTorch 1 box")
    print(f"ours 16 batched         {ours['decoder_16'] * 1e3:8.1f} ms "
          f"({ours['decoder_16'] / 16 * 1e3:.1f} ms/box)   "
          f"{micro_ratio('decoder_16', 'decoder_16_looped'):.2f}x PyTorch 16 looped")

    try:
        import openvino  # noqa: F401
        vino = micro_openvino(paths["export"], args.repeats)
    except ImportError:
        vino = None
    if vino:
        print("\n== OpenVINO on the same ONNX files (median; ratio vs onnxruntime) ==")
        for key, label in (("encoder.onnx", "encoder fp32"), ("encoder_int8.onnx",
                           "encoder int8"), ("decoder_1", "decoder 1 box"),
                           ("decoder_16", "decoder 16 boxes")):
            print(f"{label:19s} {vino[key] * 1e3:8.1f} ms   {vino[key] / ours[key]:.2f}x "
                  f"onnxruntime ({ours[key] * 1e3:.1f} ms)")

    print("\n== whole case, process start to output written (one process per case) ==")
    print("(ours int8: the same command with --int8; its DSC is against our fp32 output)")
    print(f"{'case':26s} {'PyTorch ref':>12s} {'ours (onnx)':>12s} {'ratio':>7s} "
          f"{'ours int8':>10s} {'ratio':>6s}")
    for name in args.cases:
        folder = folders[name]
        outputs = {which: workdir / f"out_{which}" / name for which in ("ref", "ours", "int8")}
        reference = [sys.executable, "benchmarks/torch_reference_predict.py", "-i", str(folder),
                     "--checkpoint", str(paths["checkpoint"])]
        ours = [sys.executable, "-m", "rep_medsam_jax.cli", "predict", "-i", str(folder),
                "--model", str(paths["export"]), "-q"]
        commands = {
            "ref": reference + ["-o", str(outputs["ref"])],
            "ours": ours + ["-o", str(outputs["ours"])],
            "int8": ours + ["-o", str(outputs["int8"]), "--int8"],
        }
        if args.original_script and CASES[name][0] == "3d" and CASES[name][2] > 1:
            outputs["orig"] = workdir / "out_orig" / name
            commands["orig"] = reference + ["-o", str(outputs["orig"]), "--original-script"]
        order = list(commands)
        times: dict[str, list[float]] = {which: [] for which in order}
        for repeat in range(args.case_repeats):
            # Rotate which pipeline goes first: the load drifts during a run.
            first = repeat % len(order)
            for which in order[first:] + order[:first]:
                shutil.rmtree(outputs[which], ignore_errors=True)
                times[which].append(whole_case(commands[which]))
        median = {which: float(np.median(t)) for which, t in times.items()}

        def paired_ratio(which: str, baseline: str) -> float:
            """Median over the repeats of which's time / baseline's time in the same repeat."""
            return float(np.median(np.array(times[which]) / np.array(times[baseline])))

        segs = {which: np.load(out / f"{name}.npz")["segs"] for which, out in outputs.items()}
        agree = float(np.mean(segs["ours"] == segs["ref"]))
        int8_dsc = label_agreement([segs["ours"]], [segs["int8"]], [CASES[name][2]])
        spread = ""
        if args.case_repeats > 1:
            spread = "   runs " + " / ".join(
                f"{which} " + " ".join(f"{t:.1f}" for t in times[which]) for which in order)
        print(f"{name:26s} {median['ref']:10.2f} s {median['ours']:10.2f} s "
              f"{paired_ratio('ours', 'ref'):6.2f}x {median['int8']:8.2f} s "
              f"{paired_ratio('int8', 'ref'):5.2f}x"
              f"   (voxel agreement with ref {agree:.4f}, int8 DSC {int8_dsc:.3f}){spread}",
              flush=True)
        if "orig" in times:
            print(f"{'':26s} original script {median['orig']:.2f} s: ours (onnx) "
                  f"{paired_ratio('ours', 'orig'):.2f}x of it", flush=True)


if __name__ == "__main__":
    with recorded_output(out_from_argv("predict")):
        main()
