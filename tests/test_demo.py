"""The main job end to end (``make demo``'s path) on built-in data, with a shortened
distillation: build held-out cases, distil, train the pipeline from the distillation WORKDIR,
fold + export to ONNX, predict with onnxruntime, evaluate, overlays; then a second run reuses
what the first built."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _label_dsc(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the ground truth's labels of 2|P & G| / (|P| + |G|), written here from the
    definition (independent of rep_medsam_jax.metrics)."""
    scores = []
    for label in np.unique(truth[truth > 0]):
        p, g = prediction == label, truth == label
        scores.append(2.0 * np.sum(p & g) / (np.sum(p) + np.sum(g)))
    return float(np.mean(scores))


def test_demo_end_to_end_then_reuse(tmp_path, capsys):
    from rep_medsam_jax.demo import main

    out = tmp_path / "demo"
    assert main(["--out", str(out), "--distill-steps", "30"]) == 0
    first_report = capsys.readouterr().out
    assert "=== report ===" in first_report and "mean DSC over the 7 held-out" in first_report

    inputs = sorted(p.name for p in (out / "test_data" / "inputs").glob("*.npz"))
    assert len(inputs) == 8 and "3DBox_MR_MNI152.npz" in inputs     # 5 2D, 2 3D, MNI152
    assert sorted(p.name for p in (out / "predictions").glob("*.npz")) == inputs
    assert len(list((out / "overlays").glob("*.png"))) == len(inputs)
    for name in ("encoder.onnx", "decoder.onnx", "export.json"):
        assert (out / "export" / name).stat().st_size > 0
    for stage in ("distill", "seg"):
        workdir = out / "train" / stage
        assert (workdir / "learning_curves.png").stat().st_size > 1000
        assert (workdir / "metrics.jsonl").stat().st_size > 0
        assert (workdir / "model" / "config.json").is_file()

    with open(out / "metrics.csv", newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == inputs
    phantom_dsc = {}
    for name in inputs:
        if "MNI152" in name:
            continue
        prediction = np.load(out / "predictions" / name)["segs"]
        truth = np.load(out / "test_data" / "gts" / name)["gts"]
        phantom_dsc[name] = _label_dsc(prediction, truth)
        assert float(rows[name]["dsc"]) == pytest.approx(phantom_dsc[name], abs=1e-3)
    print("held-out phantom DSC:", {k: round(v, 3) for k, v in phantom_dsc.items()})
    assert np.mean(list(phantom_dsc.values())) >= 0.8

    # A second run reuses the datasets and the finished stages: no training step runs again.
    logs = {stage: (out / "train" / stage / "metrics.jsonl").read_text()
            for stage in ("distill", "seg")}
    assert main(["--out", str(out), "--distill-steps", "30"]) == 0
    second_report = capsys.readouterr().out
    assert "=== report ===" in second_report and "reusing the export" in second_report
    for stage, text in logs.items():
        assert (out / "train" / stage / "metrics.jsonl").read_text() == text
