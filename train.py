#!/usr/bin/env python
"""Train one stage of Rep-MedSAM: a thin entry over ``rep_medsam_jax.training``.

    python train.py --config configs/finetune.py --workdir work_dirs/finetune \\
        [--set key=value ...] [--coordinator HOST:PORT --num-processes N --process-id I]

Rerunning the same command resumes from the last checkpoint in --workdir. The config is
checked (values, paths, device count, checkpoints already in --workdir) before anything is
computed; a problem exits with status 2 and one line saying what to fix. See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/<name>.py (or .json)")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and the model")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable), "
                        "e.g. --set optim.learning_rate=1e-4 --set data.dataset_dir=DATA")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="leave after this many steps (resume later with the same command)")
    parser.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT "
                        "(or JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes "
                        "(or JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's id "
                        "(or JAX_PROCESS_ID)")
    parser.add_argument("--distributed-auto", action="store_true",
                        help="multi-host: let JAX detect a TPU pod slice / SLURM / Open MPI job")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from rep_medsam_jax.training.config import ConfigError, load_config, validate

    try:
        config = load_config(args.config, args.overrides)
        # Everything that needs no JAX first: values, paths, checkpoints in --workdir.
        validate(config, args.workdir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(config.to_json(), indent=2))
        return 0

    from rep_medsam_jax.training import sharding

    try:
        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                        auto=args.distributed_auto or None)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    import jax

    from rep_medsam_jax.training.loop import train_and_evaluate

    try:
        validate(config, args.workdir, device_count=jax.device_count(),
                 process_count=jax.process_count())
        summary = train_and_evaluate(config, args.workdir, stop_after_steps=args.stop_after_steps)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.last_eval.items() if k != "val/count")
    print(f"done: step {summary.final_step}/{summary.total_steps} in {summary.seconds:.0f} s; "
          f"{shown}" + (f"; model: {summary.model_dir}" if summary.model_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
