"""Peak memory, open files and memory maps of a process and all its descendants (Linux /proc).

    with TreeMonitor(child.pid) as monitor:
        child.wait()
    monitor.peak.rss_bytes, monitor.peak.open_files, monitor.peak.memory_maps

A thread samples the tree every ``interval`` seconds: the processes are the root and every
process whose parent chain leads to it (``/proc/<pid>/stat``), and for each it reads the resident
set (``/proc/<pid>/statm``), the entries of ``/proc/<pid>/fd`` and the lines of
``/proc/<pid>/maps``. The peaks are of the sums over the tree at one sample (RSS summed over
processes counts pages they share once per process: an upper bound on the tree's memory).
``peak_single_rss_bytes`` is the largest high-water mark (``VmHWM``) of any one process, which
catches a peak between two samples.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")
PROC = Path("/proc")


@dataclasses.dataclass
class TreeSample:
    """One sample of a process tree (sums over its processes)."""

    processes: int = 0
    rss_bytes: int = 0
    open_files: int = 0
    memory_maps: int = 0


def parent_pids() -> dict[int, int]:
    """{pid: parent pid} of every process now visible in /proc."""
    parents = {}
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        try:
            text = (PROC / entry.name / "stat").read_text()
        except OSError:        # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = text[text.rindex(")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    parents = parent_pids()
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    tree, stack = [], [root] if root in parents else []
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, ()))
    return tree


def _read_process(pid: int) -> tuple[int, int, int, int] | None:
    """(rss bytes, open fds, memory maps, VmHWM bytes) of one process; None if it is gone."""
    base = PROC / str(pid)
    try:
        rss = int((base / "statm").read_text().split()[1]) * _PAGE
        fds = len(os.listdir(base / "fd"))
        maps = (base / "maps").read_bytes().count(b"\n")
        hwm = 0
        for line in (base / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        return None
    return rss, fds, maps, hwm


def sample_tree(root: int) -> tuple[TreeSample, int]:
    """(the tree's sums now, the largest VmHWM of one of its processes)."""
    total, largest_hwm = TreeSample(), 0
    for pid in process_tree(root):
        values = _read_process(pid)
        if values is None:
            continue
        rss, fds, maps, hwm = values
        total.processes += 1
        total.rss_bytes += rss
        total.open_files += fds
        total.memory_maps += maps
        largest_hwm = max(largest_hwm, hwm)
    return total, largest_hwm


class TreeMonitor:
    """Samples the tree of ``root`` from a background thread until the block ends; the peak of
    each sum is in ``peak`` (each field's own maximum, possibly from different samples)."""

    def __init__(self, root: int, interval: float = 0.2):
        self.root, self.interval = root, interval
        self.peak = TreeSample()
        self.peak_single_rss_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)

    def sample(self) -> None:
        now, hwm = sample_tree(self.root)
        if now.processes == 0:
            return
        self.samples += 1
        for field in dataclasses.fields(TreeSample):
            name = field.name
            setattr(self.peak, name, max(getattr(self.peak, name), getattr(now, name)))
        self.peak_single_rss_bytes = max(self.peak_single_rss_bytes, hwm)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMonitor:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
