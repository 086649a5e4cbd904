"""Starting grain worker processes from any program, not only absl apps."""

from __future__ import annotations


def allow_worker_processes() -> None:
    """grain 0.2.18 reads an absl flag when it starts worker processes and fails if absl never
    parsed its flags (any program that is not an absl app, pytest included). Marking them
    parsed keeps every default; it changes nothing when an absl app already parsed them."""
    from absl import flags  # noqa: PLC0415

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
