"""The PyTorch reference pipeline as one process per run, for whole-case timing.

Mirrors what a challenge container does (``CVPR24_LiteMedSAM_infer.py`` run by its
``predict.sh``, timed per case by ``CVPR24_time_eval.py``): import torch, build the unfused
model, load the checkpoint, fuse the encoder, then segment every case of a folder (2D / 3D by
name) and write ``segs`` npz files. The model and procedures are the test references
(tests/reference/medsam_lite_torch.py), written from the authors' code.

    python benchmarks/torch_reference_predict.py -i IN -o OUT --checkpoint rep_medsam.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input", required=True)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--original-script", action="store_true",
                        help="3D as the original, paper-timed script: every slice encoded again "
                             "for each box (baseline_infer.py), instead of the updated script's "
                             "cache")
    args = parser.parse_args()

    import numpy as np
    import torch

    from rep_medsam_jax.models.config import REPVIT_VARIANTS
    from tests.reference.medsam_lite_torch import (MedSAMLiteTorch, fused_copy, infer_2d,
                                                   infer_3d)

    torch.manual_seed(2024)
    model = MedSAMLiteTorch(REPVIT_VARIANTS["rep_medsam_m1_0"].rows)
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    model = fused_copy(model.eval())
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(args.input).glob("*.npz")):
        data = np.load(path)
        if path.name.startswith("3D"):
            segs = infer_3d(model, data["imgs"], data["boxes"],
                            original_script=args.original_script)
        else:
            segs = infer_2d(model, data["imgs"], data["boxes"])
        np.savez_compressed(out / path.name, segs=segs)


if __name__ == "__main__":
    main()
