"""Run logging: metrics to ``metrics.jsonl`` and TensorBoard (tensorboardX, no TensorFlow), and a
learning-curve PNG (matplotlib) drawn from the JSONL file.

Only process 0 writes. After a restart the JSONL lines past the restored step are dropped, so
the file reads as one uninterrupted run. A WORKDIR that is a URL (``gs://...``) cannot be appended
to: the files are written in a local folder and uploaded whole by :meth:`MetricWriter.sync` (the
loop calls it with every checkpoint, and at the end); lines written after the last checkpoint are
the ones a restart drops anyway.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rep_medsam_jax.io.storage import as_path, download, is_url, local_file, upload_tree


class MetricWriter:
    """``write(step, {"train/loss": ...})`` -> one JSONL line and TensorBoard scalars."""

    def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int = 0,
                 tensorboard: bool = True):
        self.enabled = enabled
        self._tb = None
        self._remote = as_path(workdir) if is_url(workdir) else None
        self._local = Path(workdir) if self._remote is None else None
        if enabled and self._remote is not None:     # a local copy, uploaded by sync()
            self._local = Path(tempfile.mkdtemp(prefix="rep-medsam-metrics-"))
            if (self._remote / "metrics.jsonl").is_file():
                download(self._remote / "metrics.jsonl", self._local / "metrics.jsonl")
        self.path = (self._local or self._remote) / "metrics.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415

            self._tb = SummaryWriter(str(self._local / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, int(step))

    def sync(self) -> None:
        """URL WORKDIR: upload metrics.jsonl and the TensorBoard files (local: nothing to do)."""
        if not self.enabled or self._remote is None:
            return
        if self._tb is not None:
            self._tb.flush()
        upload_tree(self._local, self._remote)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self.enabled and self._remote is not None and self._local.exists():
            self.sync()
            shutil.rmtree(self._local, ignore_errors=True)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the lines of ``path`` with step <= last_step (a restart's starting point)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue          # a line cut by a kill
    path.write_text("".join(k + "\n" for k in kept))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = as_path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_learning_curves(metrics_path: str | Path, out_path: str | Path,
                         title: str = "") -> Path | None:
    """Loss (train and validation), validation DSC / MSE and learning rate against step."""
    rows = read_jsonl(metrics_path)
    if not rows:
        return None
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    panels = [("loss", ["train/loss", "val/loss"]),
              ("validation quality", ["val/dsc", "val/mse"]),
              ("learning rate", ["train/lr"])]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for axis, (name, keys) in zip(axes, panels):
        for key in keys:
            steps, values = series(key)
            if steps:
                axis.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
        axis.set_title(name)
        axis.set_xlabel("step")
        if name == "loss":
            axis.set_yscale("log")
        if axis.lines:
            axis.legend()
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with local_file(out_path) as target:
        figure.savefig(target, dpi=100)
    plt.close(figure)
    return as_path(out_path)
