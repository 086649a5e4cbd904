"""Interactive latency: a box drawn in the app, to its mask, vs the PyTorch reference, one run.

Measured on a 512 x 512 slice of a CT phantom volume, the same random full-size Rep-MedSAM
weights on both sides (built, converted and exported as benchmarks/predict.py does):

1. cached box-to-mask: ``POST /api/doc/ID/box`` to the app's server (uvicorn, in the same
   process as a client thread, one kept-alive connection as a browser has), request in to
   label-slice PNG out, for a slice whose embedding is cached; p50 / p95 over 50 boxes. Also
   ``Segmenter.predict_slice`` alone (no HTTP).
2. first view: the same request on a slice never encoded (encoder + decoder + PNG), the
   background encoder off; median over the other slices.
3. the PyTorch reference's per-box path (``medsam_inference`` of ``CVPR24_LiteMedSAM_infer.py``:
   prompt encoder, mask decoder, bilinear resize to 512 x 512, threshold) on the cached
   embedding for the same 50 boxes; and encoder + that path for a first view.

Each side runs in its own process (onnxruntime and torch never share one), with ``--threads``
threads each. On a shared machine the load changes from one minute to the next: the two sides
run in ``--rounds`` pairs of processes, alternating which goes first; latencies are pooled over
the rounds and the ratios are medians of the per-round ratios. Raw figures go to
benchmarks/results/interactive_<date>.json.

    python benchmarks/interactive.py [--workdir DIR] [--boxes 50] [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZE, DEPTH, CACHED_SLICE = 512, 8, 4
P95_TARGET_MS = 150.0


def make_volume(workdir: Path) -> Path:
    """A (D, 512, 512) CT phantom as a challenge 3D npz (its boxes are not used)."""
    sys.path.insert(0, str(ROOT))
    from input_pipeline.phantoms import make_case_3d

    path = workdir / "interactive" / "3DBox_CT_interactive.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        case = make_case_3d(np.random.default_rng(0), "CT", (DEPTH, SIZE, SIZE))
        np.savez(path, imgs=case.imgs, boxes=case.boxes)
    return path


def random_boxes(count: int, seed: int = 0) -> list[list[int]]:
    """Boxes of 24..256 px sides inside the 512 x 512 slice."""
    rng = np.random.default_rng(seed)
    sides = rng.integers(24, 257, (count, 2))
    corners = rng.integers(0, SIZE - sides + 1)
    return np.concatenate([corners, corners + sides], axis=1).tolist()


def _run(code: str, **values) -> dict:
    """Run ``code`` (formatted with ``values`` as JSON) in a fresh interpreter; it prints one
    JSON line last."""
    source = textwrap.dedent(code)
    for key, value in values.items():
        source = source.replace(f"@{key}@", json.dumps(value))
    result = subprocess.run([sys.executable, "-c", source], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


OURS = """
import http.client, json, time
import numpy as np
from pathlib import Path
from rep_medsam_jax.app.launch import start_in_thread
from rep_medsam_jax.predictor.segmenter import Segmenter

volume_path, boxes, z_cached = Path(@volume@), @boxes@, @z@
seg = Segmenter(@export@, threads=@threads@, prefetch=0)
app = start_in_thread(seg, [volume_path.parent])
host = app.url.split("//")[1]
connection = http.client.HTTPConnection(host, timeout=120)

def call(path, body):
    connection.request("POST", path, body=json.dumps(body),
                       headers={"X-Token": app.token, "Content-Type": "application/json"})
    response = connection.getresponse()
    content = response.read()
    assert response.status == 200, content
    return content

doc = json.loads(call("/api/open", {"path": str(volume_path)}))["id"]
def box_request(z, box):
    start = time.perf_counter()
    png = call(f"/api/doc/{doc}/box", {"z": z, "label": 1, "box": box})
    assert png[:4] == b"\\x89PNG"
    return time.perf_counter() - start

first_view = [box_request(z, boxes[0]) for z in range(@depth@) if z != z_cached]
box_request(z_cached, boxes[0])                            # encodes the slice: now cached
cached = [box_request(z_cached, box) for box in boxes]
seg_alone = seg.sibling()
seg_alone.set_volume(np.load(volume_path)["imgs"])
seg_alone.predict_slice(z_cached, boxes[0])
direct = []
for box in boxes:
    start = time.perf_counter()
    seg_alone.predict_slice(z_cached, box)
    direct.append(time.perf_counter() - start)
app.stop()
print(json.dumps({"cached_http": cached, "cached_predict_slice": direct,
                  "first_view_http": first_view}))
"""

TORCH = """
import json, time
import numpy as np, torch
from rep_medsam_jax.models.config import REPVIT_VARIANTS
from tests.reference.medsam_lite_torch import (MedSAMLiteTorch, fused_copy, image_tensor,
                                               medsam_inference, resize_box_to_256)
torch.set_num_threads(@threads@)
model = MedSAMLiteTorch(REPVIT_VARIANTS["rep_medsam_m1_0"].rows)
model.load_state_dict(torch.load(@checkpoint@, map_location="cpu"))
model = fused_copy(model.eval())
volume, boxes, z_cached = np.load(@volume@)["imgs"], @boxes@, @z@
hw = volume.shape[1:]

def slice_input(z):
    return image_tensor(np.repeat(volume[z][:, :, None], 3, axis=-1))

def per_box(embedding, new_hw, box):
    box256 = resize_box_to_256(np.array(box, float), original_size=hw)
    return medsam_inference(model, embedding, box256, new_hw, hw)

with torch.no_grad():
    first_view = []
    for z in range(@depth@):
        if z == z_cached:
            continue
        start = time.perf_counter()
        tensor, new_hw = slice_input(z)
        per_box(model.image_encoder(tensor), new_hw, boxes[0])
        first_view.append(time.perf_counter() - start)
    tensor, new_hw = slice_input(z_cached)
    embedding = model.image_encoder(tensor)
    per_box(embedding, new_hw, boxes[0])
    cached = []
    for box in boxes:
        start = time.perf_counter()
        per_box(embedding, new_hw, box)
        cached.append(time.perf_counter() - start)
print(json.dumps({"cached": cached, "first_view": first_view}))
"""


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "work_dirs" / "bench_predict"),
                        help="where the random full-size model is built (shared with "
                             "benchmarks/predict.py)")
    parser.add_argument("--boxes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=2,
                        help="pairs of (ours, PyTorch) processes, alternating which goes first")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from predict import prepare         # the random full-size checkpoint, converted, exported

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir)
    volume = make_volume(workdir)
    boxes = random_boxes(args.boxes)
    common = {"volume": str(volume), "boxes": boxes, "z": CACHED_SLICE, "depth": DEPTH,
              "threads": args.threads}
    rounds = []
    for index in range(args.rounds):
        sides = {"ours": lambda: _run(OURS, export=str(paths["export"]), **common),
                 "pytorch": lambda: _run(TORCH, checkpoint=str(paths["checkpoint"]), **common)}
        order = list(sides) if index % 2 == 0 else list(sides)[::-1]
        rounds.append({name: sides[name]() for name in order})
        print(f"round {index + 1}/{args.rounds} done (first: {order[0]})", flush=True)
    ours = {key: sum((r["ours"][key] for r in rounds), []) for key in rounds[0]["ours"]}
    torch_ref = {key: sum((r["pytorch"][key] for r in rounds), [])
                 for key in rounds[0]["pytorch"]}

    def round_ratio(our_key: str, ref_key: str) -> float:
        return float(np.median([_ms(r["ours"][our_key], 50) / _ms(r["pytorch"][ref_key], 50)
                                for r in rounds]))

    rows = {
        "cached box-to-mask, app HTTP": ours["cached_http"],
        "cached box-to-mask, Segmenter.predict_slice": ours["cached_predict_slice"],
        "cached box-to-mask, PyTorch per-box path": torch_ref["cached"],
        "first view (encode + box), app HTTP": ours["first_view_http"],
        "first view (encode + box), PyTorch": torch_ref["first_view"],
    }
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores (load average {load}), {args.threads} threads; "
          f"{SIZE}x{SIZE} slices; random full-size rep_medsam_m1_0 weights; {len(boxes)} boxes")
    for name, values in rows.items():
        print(f"  {name:46s} p50 {_ms(values, 50):7.1f} ms   p95 {_ms(values, 95):7.1f} ms"
              f"   (n={len(values)})")
    ratio_cached = round_ratio("cached_http", "cached")
    ratio_first = round_ratio("first_view_http", "first_view")
    p95 = _ms(ours["cached_http"], 95)
    print(f"ratio ours / PyTorch (p50, median over {len(rounds)} rounds): cached box "
          f"{ratio_cached:.3f}x, first view {ratio_first:.2f}x")
    print(f"cached box-to-mask p95 {p95:.1f} ms: "
          f"{'within' if p95 < P95_TARGET_MS else 'OVER'} the {P95_TARGET_MS:.0f} ms target")

    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    target = results / f"interactive_{stamp}.json"
    target.write_text(json.dumps({
        "machine": {"cores": os.cpu_count(), "threads": args.threads},
        "slice": [SIZE, SIZE], "depth": DEPTH, "boxes": boxes,
        "seconds_per_round": rounds,
        "load_average_1_5_15": list(os.getloadavg()),
        "summary_ms": {name: {"p50": _ms(v, 50), "p95": _ms(v, 95)} for name, v in rows.items()},
        "ratio_p50": {"cached": ratio_cached, "first_view": ratio_first},
    }, indent=1))
    print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
