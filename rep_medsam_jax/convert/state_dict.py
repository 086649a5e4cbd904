"""Strict reading of PyTorch state dicts (as NumPy arrays) into Flax variable trees.

Converters call ``reader.take(key, shape)`` for every tensor they expect. Problems are collected
rather than raised one at a time, so that ``reader.finish()`` reports every missing key,
unexpected key and shape mismatch in one error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model being built."""

    def __init__(self, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
                 context: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint does not match {context or 'the model'}:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s): " + ", ".join(_head(missing)))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s): " + ", ".join(_head(unexpected)))
        for key, want, got in mismatched[:20]:
            lines.append(f"  shape mismatch for {key}: expected {want}, checkpoint has {got}")
        if len(mismatched) > 20:
            lines.append(f"  ... and {len(mismatched) - 20} more shape mismatches")
        super().__init__("\n".join(lines))


def _head(items: list, n: int = 20) -> list:
    if len(items) <= n:
        return list(items)
    return list(items[:n]) + [f"... ({len(items) - n} more)"]


class StateDictReader:
    """Hands out tensors of a flat ``{key: array}`` dict and remembers what was asked for."""

    def __init__(self, state: Mapping[str, np.ndarray], context: str = ""):
        self._state = dict(state)
        self._consumed: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        self.context = context

    def keys(self) -> list[str]:
        return list(self._state)

    def has(self, key: str) -> bool:
        return key in self._state

    def take(self, key: str, shape: Iterable[int]) -> np.ndarray:
        """The tensor at ``key`` as float32 NumPy, checked against ``shape``.

        A missing or mis-shaped tensor is recorded and zeros are returned, so that conversion
        continues and ``finish`` can report every problem at once.
        """
        shape = tuple(int(s) for s in shape)
        if key not in self._state:
            self.missing.append(key)
            return np.zeros(shape, np.float32)
        self._consumed.add(key)
        value = np.asarray(self._state[key])
        if tuple(value.shape) != shape:
            self.mismatched.append((key, shape, tuple(value.shape)))
            return np.zeros(shape, np.float32)
        return value.astype(np.float32)

    def skip(self, key: str) -> None:
        """Mark a key as known but unused (e.g. BatchNorm's ``num_batches_tracked``)."""
        if key in self._state:
            self._consumed.add(key)

    def skip_prefix(self, prefix: str) -> list[str]:
        """Mark every key under ``prefix`` as known but unused; returns those keys."""
        keys = [k for k in self._state if k.startswith(prefix)]
        self._consumed.update(keys)
        return keys

    def unexpected(self) -> list[str]:
        return sorted(set(self._state) - self._consumed)

    def finish(self) -> None:
        """Raise one ``CheckpointMismatchError`` listing every problem, if there is any."""
        unexpected = self.unexpected()
        if self.missing or unexpected or self.mismatched:
            raise CheckpointMismatchError(sorted(self.missing), unexpected, self.mismatched,
                                          self.context)


# --- PyTorch -> Flax tensor layouts -------------------------------------------------------

def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """Conv2d weight (O, I/groups, kh, kw) -> Flax HWIO (kh, kw, I/groups, O)."""
    return np.transpose(weight, (2, 3, 1, 0))


def linear_kernel(weight: np.ndarray) -> np.ndarray:
    """Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return np.transpose(weight, (1, 0))


def conv_shape_hwio(out_ch: int, in_per_group: int, k: int) -> tuple[int, int, int, int]:
    """The PyTorch (O, I/g, k, k) shape for a conv whose Flax kernel will be (k, k, I/g, O)."""
    return (out_ch, in_per_group, k, k)
