"""Teacher cache: storage precision of the embeddings and the three teacher-input paths.

    PYTHONPATH=. python benchmarks/teacher_precision.py [--variant medsam_vit_b] [--repeats 2]

On real images shipped with the installed packages (scikit-image ``data.retina()`` and
``data.immunohistochemistry()``, pydicom's ``CT_small.dcm``, nilearn's MNI152 T1 template: an
axial and a coronal slice), each made into a stored 256 slice as the dataset does (longest side
256, INTER_AREA, zero padded), with the teacher ViT (random weights, seed 0: no MedSAM weights
are used here):

1. teacher inputs: max |difference| of the ``grey`` and ``device`` paths' 1024 inputs and of
   their embeddings against the scikit-image reference; seconds per slice and slices/s on one
   CPU core for the host part of each path (the ``device`` path's host part is a matrix lookup;
   its resize runs on the device, timed separately), ratios against the reference side by side;
2. storage: for float16, bfloat16 and int8 (per slice and channel), max / mean |error| and
   relative RMS error against the float32 embedding, bytes per slice and TB per million slices;
3. distillation loss: a student embedding s = t32 + noise (noise RMS = k x RMS(t32)); the
   relative change of MSE(s, stored) against MSE(s, t32) and of its gradient 2 (s - t) / n.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from record import add_out_argument, out_from_argv, recorded_output

ROOT = Path(__file__).resolve().parents[1]
STORAGE = ("float32", "float16", "bfloat16", "int8")
NOISE_LEVELS = (0.01, 0.03, 0.1, 0.3)


def real_slices() -> dict[str, np.ndarray]:
    """name -> (H, W) or (H, W, 3) uint8, as the dataset builder would see the slice."""
    from skimage import data

    from rep_medsam_jax.preprocess import percentile_to_uint8, window_ct

    slices = {"retina (RGB 1411x1411)": data.retina(),
              "immunohistochemistry (RGB 512x512)": data.immunohistochemistry()}
    import pydicom
    from pydicom.data import get_testdata_file

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    slices["CT_small.dcm (grey 128x128)"] = window_ct(hu)
    try:
        from nilearn import datasets

        volume = np.asarray(datasets.load_mni152_template(resolution=1).get_fdata())
        volume = percentile_to_uint8(volume)
        slices[f"MNI152 axial (grey {volume.shape[0]}x{volume.shape[1]})"] = \
            volume[:, :, volume.shape[2] // 2]
        slices[f"MNI152 coronal (grey {volume.shape[0]}x{volume.shape[2]})"] = \
            volume[:, volume.shape[1] // 2, :]
    except Exception as err:  # noqa: BLE001  (optional source)
        print(f"(MNI152 skipped: {err})")
    return slices


def stored_slice(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's stored slice: (256, 256, 3) uint8 and its valid (newh, neww)."""
    from rep_medsam_jax.preprocess import pad_to_square, resize_longest_side, to_three_channels

    resized = resize_longest_side(to_three_channels(image), 256)
    return pad_to_square(resized, 256), np.array(resized.shape[:2])


def timed(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="medsam_vit_b")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (best taken)")
    add_out_argument(parser, "teacher_precision")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import jax

    from input_pipeline.teacher_cache import load_teacher, make_encode_fn
    from input_pipeline.teacher_inputs import device_teacher_inputs, prepare_batch
    from input_pipeline.teacher_storage import slice_nbytes, stored_values

    teacher = load_teacher(variant=args.variant, random_seed=0)
    size = teacher.config.img_size
    print(f"teacher {args.variant} (random weights, seed 0), input {size}; jax "
          f"{jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s))")
    slices = {name: stored_slice(image) for name, image in real_slices().items()}
    encode = make_encode_fn(teacher, 1, "reference")          # float32 inputs -> float32
    encode_device = make_encode_fn(teacher, 1, "device")
    device_inputs = jax.jit(device_teacher_inputs)

    print("\n1. teacher inputs against the scikit-image reference (one slice at a time)")
    header = (f"{'slice':38s} {'path':9s} {'host s':>7s} {'slices/s/core':>13s} "
              f"{'x ref':>6s} {'max|dx|':>9s} {'max|d emb|':>10s} {'rel':>8s}")
    print(header)
    embeddings32, totals = {}, {"reference": 0.0, "grey": 0.0, "device": 0.0, "device_run": 0.0}
    for name, (image, hw) in slices.items():
        seconds, batches = {}, {}
        for mode in ("reference", "grey", "device"):
            seconds[mode], batches[mode] = timed(
                lambda mode=mode: prepare_batch([image], [hw], mode, size), args.repeats)
            totals[mode] += seconds[mode]
        jax.block_until_ready(device_inputs(batches["device"]))           # compile
        seconds["device_run"], made = timed(
            lambda: jax.block_until_ready(device_inputs(batches["device"])), args.repeats)
        totals["device_run"] += seconds["device_run"]
        reference = batches["reference"]["inputs"]
        emb_ref = encode(batches["reference"])
        embeddings32[name] = emb_ref
        peak = np.abs(emb_ref).max()
        for mode in ("reference", "grey", "device"):
            if mode == "reference":
                diff_x, diff_e = 0.0, 0.0
            elif mode == "grey":
                diff_x = np.abs(batches["grey"]["inputs"] - reference).max()
                # Identical inputs give the identical embedding: no second forward needed.
                diff_e = np.abs(encode(batches["grey"]) - emb_ref).max() if diff_x else 0.0
            else:
                diff_x = np.abs(np.asarray(made) - reference).max()
                diff_e = np.abs(encode_device(batches["device"]) - emb_ref).max()
            print(f"{name:38s} {mode:9s} {seconds[mode]:7.3f} {1 / seconds[mode]:13.1f} "
                  f"{seconds['reference'] / seconds[mode]:6.1f} {diff_x:9.2e} {diff_e:10.2e} "
                  f"{diff_e / peak:8.1e}")
        print(f"{'':38s} device resize+min-max on {jax.devices()[0].platform}: "
              f"{seconds['device_run']:.4f} s")
    count = len(slices)
    print("\nmean host seconds per slice (one core): " + ", ".join(
        f"{mode} {totals[mode] / count:.3f} s ({count / totals[mode]:.1f} slices/s, "
        f"{totals['reference'] / totals[mode]:.1f}x reference)"
        for mode in ("reference", "grey", "device")))
    print(f"device path, resize on the {jax.devices()[0].platform} device: "
          f"{totals['device_run'] / count:.4f} s per slice")
    probe = next(iter(slices.values()))
    batch = prepare_batch([probe[0]], [probe[1]], "device", size)
    encode_device(batch)
    tick = time.perf_counter()
    for _ in range(args.repeats):
        encode_device(batch)
    per_slice = (time.perf_counter() - tick) / args.repeats
    print(f"teacher forward incl. device inputs, batch 1: {per_slice:.2f} s per slice "
          f"({1 / per_slice:.3f} slices/s per {jax.devices()[0].platform} device)")

    shape = teacher.embedding_shape
    print(f"\n2. storage of the {shape} embedding against float32")
    print(f"{'dtype':9s} {'bytes/slice':>12s} {'TB/1e6 slices':>13s} {'max|err|':>9s} "
          f"{'mean|err|':>9s} {'rel RMS':>8s}")
    stacked = np.concatenate(list(embeddings32.values())).astype(np.float32)
    stored = {}
    for dtype in STORAGE:
        nbytes = int(np.prod(shape)) * 4 if dtype == "float32" else slice_nbytes(shape, dtype)
        stored[dtype] = stacked if dtype == "float32" else stored_values(stacked, dtype)
        error = stored[dtype] - stacked
        rel = np.sqrt((error ** 2).mean() / (stacked ** 2).mean())
        print(f"{dtype:9s} {nbytes:12d} {nbytes * 1e6 / 1e12:13.2f} {np.abs(error).max():9.2e} "
              f"{np.abs(error).mean():9.2e} {rel:8.1e}")

    print("\n3. distillation loss MSE(student, stored) against MSE(student, float32 target);")
    print("   student = target + noise, noise RMS = k x RMS(target); relative changes")
    rng = np.random.default_rng(0)
    rms = np.sqrt((stacked ** 2).mean())
    print(f"{'k':>5s} {'loss/var':>9s} " + " ".join(
        f"{d + ' loss':>14s} {d + ' grad':>14s}" for d in STORAGE[1:]))
    for level in NOISE_LEVELS:
        student = stacked + rng.normal(size=stacked.shape).astype(np.float32) * level * rms
        loss32 = ((student - stacked) ** 2).mean()
        cells = []
        for dtype in STORAGE[1:]:
            loss = ((student - stored[dtype]) ** 2).mean()
            grad_change = np.linalg.norm(stored[dtype] - stacked) / np.linalg.norm(
                student - stacked)
            cells.append(f"{abs(loss - loss32) / loss32:14.1e} {grad_change:14.1e}")
        print(f"{level:5.2f} {loss32 / stacked.var():9.1e} " + " ".join(cells))


if __name__ == "__main__":
    with recorded_output(out_from_argv("teacher_precision")):
        main()
