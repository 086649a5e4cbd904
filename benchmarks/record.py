"""Raw result files of the benchmark scripts, under ``benchmarks/results/``.

Every script prints its report and, through :func:`recorded_output`, also writes it to a text
file (``with recorded_output(out_from_argv(NAME)): main()``): a header of ``# key: value``
lines (the command, the git commit, the machine, the UTC time), then exactly what it printed.
Scripts with row data (``gpu_parity.py``, ``train_step.py``) write JSON through
:func:`write_json`. Files are written to a temporary name and renamed, so a run that fails
leaves no half-written result. ``--out -`` writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Iterator

RESULTS = Path(__file__).resolve().parent / "results"
NO_FILE = "-"


def default_out(name: str, suffix: str = ".txt") -> Path:
    """``benchmarks/results/<name>-<UTC time><suffix>``, e.g. ``predict-20261127T1434Z.txt``."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%MZ")
    return RESULTS / f"{name}-{stamp}{suffix}"


def add_out_argument(parser: argparse.ArgumentParser, name: str, suffix: str = ".txt",
                     flag: str = "--out") -> None:
    """``flag`` (default ``--out``): where the raw result goes; default ``default_out(name)``."""
    parser.add_argument(flag, default=None, metavar="FILE",
                        help=f"raw result file (default: benchmarks/results/{name}-<UTC time>"
                             f"{suffix}; '{NO_FILE}' writes none)")


def resolve_out(out: str | None, name: str, suffix: str = ".txt") -> Path | None:
    """The file to write: ``out`` as given, the default for ``None``, nothing for ``'-'``."""
    if out == NO_FILE:
        return None
    return Path(out) if out else default_out(name, suffix)


def out_from_argv(name: str, suffix: str = ".txt") -> Path | None:
    """The ``--out`` of this process's command line, resolved as :func:`resolve_out` does; for
    wrapping a script's ``main()`` (which declares the same option with
    :func:`add_out_argument`, for its ``--help``)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_out_argument(parser, name, suffix)
    known, _ = parser.parse_known_args()
    return resolve_out(known.out, name, suffix)


def _cpu_name() -> str:
    """The CPU model as Linux names it (``/proc/cpuinfo``), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_header() -> dict[str, str]:
    """What identifies a run: command line, commit (with ``+dirty`` for local changes), machine,
    Python, and the UTC time."""
    root = RESULTS.parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, "
                   f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy."""

    def __init__(self, stream) -> None:
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def recorded_output(path: Path | None) -> Iterator[None]:
    """Inside the block, everything printed to ``sys.stdout`` is also kept; on a normal exit it
    is written to ``path`` after the :func:`run_header` lines (nothing on an exception, nothing
    when ``path`` is None)."""
    if path is None:
        yield
        return
    header = run_header()
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = tee.stream
    lines = "".join(f"# {key}: {value}\n" for key, value in header.items())
    _write_atomic(path, lines + tee.copy.getvalue())
    print(f"raw result: {path}")


def write_json(path: Path | None, rows) -> None:
    """``{"run": run_header(), "rows": rows}`` to ``path`` (nothing when ``path`` is None)."""
    if path is None:
        return
    _write_atomic(path, json.dumps({"run": run_header(), "rows": rows}, indent=1) + "\n")
    print(f"raw result: {path}")
