"""Build the training dataset from folders of cases (or from built-in phantoms).

    python -m input_pipeline.build --source CASES [MORE ...] --data-dir DATA
    python -m input_pipeline.build --source CASES --data-dir DATA --runner direct --workers 8
    python -m input_pipeline.build --source /mnt/CASES --data-dir /mnt/DATA --runner dataflow \
        --beam-option project=P --beam-option region=R --beam-option temp_location=gs://B/tmp
    python -m input_pipeline.build --phantoms 12 4 --data-dir DATA      # built-in data, no files
    python -m input_pipeline.build --phantoms 12 4 --mni152 --data-dir DATA

``--runner none`` (the default) builds in this process; any other runner runs the build as
Apache Beam pipelines (``pip install '.[beam]'``; see input_pipeline/beam_build.py). Progress
goes to stderr, one line per case (from the Beam workers under a runner); a skipped case is
reported with its reason and the build goes on. Rerunning the same command resumes an
interrupted build (finished cases are reused) and reuses a finished dataset. The dataset lands
in DATA/med_sam_slices/size<S>/2.0.0; the summary names it and the skipped cases. DATA may be a
URL (``gs://bucket/data``): the dataset is built locally and uploaded
(``input_pipeline.remote_build``), and phantom cases are written to a temporary folder.
Exit status: 0 built, 1 nothing could be built, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from pathlib import Path

from input_pipeline.remote_build import build_dataset_at
from input_pipeline.tfds_builder import BuildError, BuildOptions
from rep_medsam_jax.io.storage import is_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m input_pipeline.build",
                                     description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--source", nargs="+", action="extend", metavar="ROOT",
                       help="folder(s) of cases, searched at any depth (see "
                            "input_pipeline/sources.py); repeat or list several")
    where.add_argument("--phantoms", type=int, nargs=2, metavar=("N2D", "N3D"),
                       help="write N2D 2D and N3D 3D phantom cases to DATA/phantoms and build "
                            "from them")
    parser.add_argument("--mni152", action="store_true",
                        help="with --phantoms: add nilearn's MNI152 brain as a real 3D MR case")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--data-dir", required=True, help="tfds data folder (created)")
    parser.add_argument("--work-dir", help="per-case work folder (default under --data-dir)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--min-mask-pixels", type=int, default=1)
    parser.add_argument("--modality", help="NIfTI modality when no metadata names one (CT: "
                                           "windowing, else percentile clipping)")
    parser.add_argument("--ct-window", type=float, nargs=2, metavar=("LEVEL", "WIDTH"),
                        help="NIfTI CT window in HU (default 40 400)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild an existing dataset (per-case work is still reused)")
    parser.add_argument("--num-shards", type=int,
                        help="array_record files per split (default: one per ~1 GiB of "
                             "serialised records, ~5,000 slices at 256)")
    parser.add_argument("--runner", default="none",
                        choices=["none", "direct", "dataflow", "spark", "flink"],
                        help="none: build in this process; else an Apache Beam runner")
    parser.add_argument("--workers", type=int, default=1,
                        help="--runner direct: worker processes on this machine")
    parser.add_argument("--beam-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a Beam pipeline option passed through (repeat), e.g. "
                             "project=my-project, temp_location=gs://bucket/tmp")
    args = parser.parse_args(argv)
    if args.mni152 and not args.phantoms:
        parser.error("--mni152 goes with --phantoms")
    if args.runner == "none" and (args.workers != 1 or args.beam_option):
        parser.error("--workers and --beam-option need a Beam --runner")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    beam = None
    if args.runner != "none":
        try:
            from input_pipeline.beam_build import BeamSettings  # noqa: PLC0415
        except ImportError as err:
            print(f"error: --runner {args.runner} needs Apache Beam (pip install "
                  f"'rep-medsam-jax[beam]'): {err}", file=sys.stderr)
            return 2
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
        beam = BeamSettings(args.runner, args.workers, tuple(args.beam_option))
        try:
            beam.pipeline_args()
        except ValueError as err:
            parser.error(str(err))

    with contextlib.ExitStack() as stack:
        return _build(args, beam, stack)


def _build(args: argparse.Namespace, beam, stack: contextlib.ExitStack) -> int:
    source = args.source
    if args.phantoms:
        from input_pipeline.phantoms import mni152_case, write_phantom_dataset  # noqa: PLC0415

        local = (Path(stack.enter_context(tempfile.TemporaryDirectory()))
                 if is_url(args.data_dir) else Path(args.data_dir))
        folder = local / "phantoms"
        written = write_phantom_dataset(folder, n2d=args.phantoms[0], n3d=args.phantoms[1],
                                        seed=args.seed)
        if args.mni152:
            mni152_case(folder)
        source = [written.inputs_dir.parent]
    options = BuildOptions(image_size=args.image_size,
                           validation_fraction=args.validation_fraction,
                           split_seed=args.split_seed, min_mask_pixels=args.min_mask_pixels,
                           default_modality=args.modality,
                           ct_window=tuple(args.ct_window) if args.ct_window else None)
    try:
        result = build_dataset_at(source, args.data_dir, options, work_dir=args.work_dir,
                                  overwrite=args.overwrite, log=logging.getLogger(__name__).info,
                                  beam=beam, num_shards=args.num_shards)
    except (BuildError, NotADirectoryError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{split}: {count}" for split, count in result.split_sizes.items())
    # tfds prints its own lines to stdout; this one is easy to find (and to parse).
    skipped = [r.case_id for r in result.skipped]
    named = ", ".join(skipped[:20]) + (f", ... ({len(skipped) - 20} more)"
                                       if len(skipped) > 20 else "")
    print(f"dataset: {result.dataset_dir}\n  records: {sizes}; cases skipped: {len(skipped)}"
          + (f" ({named}; reasons in build_report.json)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
