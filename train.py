#!/usr/bin/env python
"""Train one stage of Rep-MedSAM: a thin entry over ``rep_medsam_jax.training``.

    python train.py --config configs/finetune.py --workdir work_dirs/finetune \\
        [--config.key=value ...] [--coordinator HOST:PORT --num_processes N --process_id I]

``--config`` is an ``ml_collections`` config file (``get_config()``); any value in it is
overridden with ``--config.<dotted.key>=<value>`` (e.g. ``--config.optim.learning_rate=1e-4``,
``--config.data.phantoms=(40,0)``). Rerunning the same command resumes from the last
checkpoint in --workdir. The config is checked (values, paths, device count, checkpoints already
in --workdir) before anything is computed; a problem exits with status 2 and one line saying
what to fix. SIGTERM / SIGINT save the step in flight and exit 0. See docs/training.md.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<name>.py (get_config() -> ml_collections.ConfigDict); override "
    "values with --config.key=value", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and the model")
flags.DEFINE_integer("stop_after_steps", None,
                     "leave after this many steps (resume later with the same command)")
flags.DEFINE_string("coordinator", None,
                    "multi-host: coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
flags.DEFINE_integer("num_processes", None,
                     "multi-host: number of processes (or JAX_NUM_PROCESSES)")
flags.DEFINE_integer("process_id", None, "multi-host: this process's id (or JAX_PROCESS_ID)")
flags.DEFINE_bool("distributed_auto", False,
                  "multi-host: let JAX detect a TPU pod slice / SLURM / Open MPI job")
flags.DEFINE_bool("compilation_cache", True,
                  "keep compiled programs on disk so that a restart does not compile again "
                  "(--nocompilation_cache: off)")
flags.DEFINE_string("compilation_cache_dir", None, "the compilation cache folder (default: "
                    "JAX_COMPILATION_CACHE_DIR, else ~/.cache/rep_medsam_jax/jax_compilation)")
flags.DEFINE_bool("print_config", False, "print the resolved config as JSON and exit")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag or override reported in one line (exit status 2)."""
    try:
        return FLAGS(argv)
    except flags.Error as err:                  # a wrong type, a missing --workdir, ...
        message = str(err)
    except (AttributeError, KeyError) as err:   # --config.<a key the config does not have>
        text = str(err).replace("\\'", "'").replace("\\n", " ")
        names = re.findall(r"'(\w+)'", text)
        hint = re.search(r'Did you mean "(\w+)"', text)
        message = (f"--config: unknown key {names[0] if names else text!r}"
                   + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
    print(f"config error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (overrides are "
                             "--config.key=value)")
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from rep_medsam_jax.training.config import ConfigError, from_config_dict, validate

    try:
        config = from_config_dict(_CONFIG.value)
        # Everything that needs no JAX first: values, paths, checkpoints in --workdir.
        validate(config, FLAGS.workdir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if FLAGS.print_config:
        import json

        print(json.dumps(config.to_json(), indent=2))
        return 0

    from rep_medsam_jax.training import compile_cache, sharding

    if FLAGS.compilation_cache:
        compile_cache.enable_compilation_cache(FLAGS.compilation_cache_dir)
    else:
        compile_cache.disable_compilation_cache()
    try:
        sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                                        auto=FLAGS.distributed_auto or None)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    import jax

    from rep_medsam_jax.training.loop import train_and_evaluate

    try:
        validate(config, FLAGS.workdir, device_count=jax.device_count(),
                 process_count=jax.process_count())
        summary = train_and_evaluate(config, FLAGS.workdir,
                                     stop_after_steps=FLAGS.stop_after_steps)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if summary.stopped_by:
        print(f"stopped by {summary.stopped_by} at step {summary.final_step}/"
              f"{summary.total_steps}: checkpoint saved; rerun the same command to resume")
        return 0
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.last_eval.items() if k != "val/count")
    print(f"done: step {summary.final_step}/{summary.total_steps} in {summary.seconds:.0f} s; "
          f"{shown}" + (f"; model: {summary.model_dir}" if summary.model_dir else ""))
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
