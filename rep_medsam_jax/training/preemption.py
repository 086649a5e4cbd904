"""Stopping cleanly when the machine is about to go away, and deciding it on every host together.

Preemptible capacity announces the end with a signal: a TPU VM and a spot / preemptible GPU VM
send SIGTERM to the processes (about 30 s before the machine stops), SLURM sends the signal
chosen with ``sbatch --signal`` (e.g. ``--signal=TERM@120``: SIGTERM 120 s before the time
limit), and Ctrl-C sends SIGINT. :class:`StopSignals` turns either into a flag; the loop then
finishes the step in flight, writes a checkpoint of that step and returns.

Several processes must stop after the *same* step (a checkpoint is written collectively), but
the signal may reach them at different moments, or reach only one. :class:`HostAgreement`
combines every process's flags with a max over the device mesh: each process posts its flags
after dispatching step k and reads the combined value after dispatching step k + 1, so the read
waits only for step k (the device keeps one step queued) and every process reads the same
value at the same step. With one process the flags apply at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_LOG = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context manager: while active, SIGTERM and SIGINT set :attr:`requested` instead of
    ending the process; the previous handlers come back on exit.

    A second SIGINT raises KeyboardInterrupt (an impatient Ctrl-C still stops at once). Outside
    the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.requested = False
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.received = self.received or name
        _LOG.warning("%s received: finishing the step in flight, saving a checkpoint, then "
                     "stopping (rerun the same command to resume)", name)


class HostAgreement:
    """Per-process boolean flags -> the same combined flags (logical OR) on every process.

    ``exchange(flags)`` posts this process's flags and returns the combined flags that apply
    to the step just dispatched: with one process, ``flags`` themselves; with several, the
    flags every process posted at the previous call (all False at the first call).
    """

    def __init__(self, mesh: Mesh, count: int):
        self.count = count
        self._posted: jax.Array | None = None
        self._multi = jax.process_count() > 1
        if self._multi:
            # One row per device, split over the mesh; the max over rows is replicated.
            self._sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
            self._local_rows = len(mesh.local_devices)
            self._combine = jax.jit(lambda rows: jnp.max(rows, axis=0),
                                    out_shardings=NamedSharding(mesh, PartitionSpec()))

    def exchange(self, flags: Sequence[bool]) -> tuple[bool, ...]:
        if len(flags) != self.count:
            raise ValueError(f"expected {self.count} flags, got {len(flags)}")
        if not self._multi:
            return tuple(bool(f) for f in flags)
        previous = self._posted
        rows = np.tile(np.asarray(flags, np.int32)[None], (self._local_rows, 1))
        self._posted = self._combine(
            jax.make_array_from_process_local_data(self._sharding, rows))
        if previous is None:
            return (False,) * self.count
        return tuple(bool(v) for v in np.asarray(previous.addressable_data(0)))
