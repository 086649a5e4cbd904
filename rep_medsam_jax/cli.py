"""The ``rep-medsam`` command: convert | export | predict | evaluate | models | app.

Each subcommand imports only what it needs, so ``predict`` with the ONNX backend starts without
JAX or PyTorch. Models can be named entries of the model store (:mod:`rep_medsam_jax.model_store`)
as well as paths.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rep_medsam_jax import model_store


def _output_dir(args: argparse.Namespace, kind: model_store.Kind) -> Path:
    """``-o PATH`` as given, or ``--name NAME`` in the model store."""
    return Path(args.output) if args.output else model_store.store_path(kind, args.name)


def _add_output_options(p: argparse.ArgumentParser, what: str, kind: str) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", help=f"{what} to create")
    target.add_argument("--name", help=f"create it in the model store as {kind}/NAME "
                                       f"(see `rep-medsam models`)")


def _cmd_convert(args: argparse.Namespace) -> int:
    from rep_medsam_jax.convert.checkpoints import convert_checkpoint  # noqa: PLC0415

    output = _output_dir(args, "models")
    config, notes = convert_checkpoint(args.checkpoint, args.kind, output,
                                       overwrite=args.overwrite)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {output} ({config.encoder} {config.encoder_variant or '-'})")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="PyTorch checkpoint (.pth) -> model directory",
                       description="Convert a MedSAM ViT-B, LiteMedSAM or Rep-MedSAM PyTorch "
                                   "checkpoint into a model directory (orbax + config.json).")
    p.add_argument("--from", dest="kind", required=True,
                   choices=("medsam", "litemedsam", "rep-medsam"), help="checkpoint layout")
    p.add_argument("checkpoint", help="the .pth file (raw state dict or {'model': ...})")
    _add_output_options(p, "MODEL_DIR", "models")
    p.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")
    p.set_defaults(func=_cmd_convert)


def _cmd_export(args: argparse.Namespace) -> int:
    from rep_medsam_jax.export.onnx_export import export_model_dir  # noqa: PLC0415

    model_dir = model_store.resolve(args.model_dir, "models")
    output = _output_dir(args, "exports")
    calibration = None
    if args.int8 and args.calibration:
        from rep_medsam_jax.export.quantize import load_calibration_images  # noqa: PLC0415
        from rep_medsam_jax.model_dir import read_model_config  # noqa: PLC0415

        image_size = read_model_config(model_dir)[0].image_size
        calibration = load_calibration_images(args.calibration, args.calibration_count,
                                              size=image_size)
    meta = export_model_dir(model_dir, output, int8=args.int8,
                            calibration_images=calibration, overwrite=args.overwrite)
    print(f"wrote {output}: " + ", ".join(sorted(meta["checksums"])))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="model directory -> verified ONNX export directory",
                       description="Fold the encoder and export the image encoder and the "
                                   "prompt encoder + mask decoder to ONNX, each verified "
                                   "against JAX before it is written.")
    p.add_argument("model_dir", help="MODEL_DIR (from convert or training), or a model "
                                     "store name")
    _add_output_options(p, "EXPORT_DIR", "exports")
    p.add_argument("--int8", action="store_true",
                   help="also write a static per-channel int8 encoder (QDQ), calibrated")
    p.add_argument("--calibration", help="folder of cases/images for int8 calibration "
                                         "(default: built-in phantom cases)")
    p.add_argument("--calibration-count", type=int, default=16,
                   help="number of calibration images (default 16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing EXPORT_DIR")
    p.set_defaults(func=_cmd_export)


def _parse_box(text: str) -> list[float]:
    values = [float(v) for v in text.replace(",", " ").split()]
    if len(values) not in (4, 6):
        raise argparse.ArgumentTypeError(
            f"a box is 4 numbers (x0 y0 x1 y1) or 6 (x0 y0 z0 x1 y1 z1), got {text!r}")
    return values


def _cmd_predict(args: argparse.Namespace) -> int:
    from rep_medsam_jax.predictor.backend import open_backend  # noqa: PLC0415
    from rep_medsam_jax.predictor.run import case_paths, predict_folder  # noqa: PLC0415

    case_paths(args.input)         # a wrong input fails here, before the model is loaded
    if args.ct_window is not None and not args.ct_window[1] > 0:
        raise ValueError(f"--ct-window: the width must be positive, got {args.ct_window[1]:g}")
    model = model_store.resolve(args.model, "models" if args.backend == "jax" else "exports")
    backend = open_backend(model, args.backend, threads=args.threads, int8=args.int8)
    summary = predict_folder(backend, args.input, args.output, overlay_dir=args.overlay,
                             boxes_override=args.box, modality=args.modality,
                             ct_window=args.ct_window, show_progress=not args.quiet)
    print(summary.report())
    return 1 if summary.failures else 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment a folder of cases on the CPU",
                       description="Segment every case in INPUT_DIR (challenge .npz; NIfTI, "
                                   "PNG/JPEG, DICOM files and DICOM series folders, each "
                                   "with a JSON box sidecar) into OUTPUT_DIR, same names.")
    p.add_argument("-i", "--input", required=True,
                   help="INPUT_DIR, or one case file (.npz, .nii.gz, .png, .dcm, ...)")
    p.add_argument("-o", "--output", required=True, help="OUTPUT_DIR")
    p.add_argument("--model", required=True,
                   help="EXPORT_DIR (onnx, openvino) or MODEL_DIR (jax), or a model store name")
    p.add_argument("--backend", default="onnx", choices=("onnx", "openvino", "jax"))
    p.add_argument("--box", type=_parse_box, action="append",
                   help="a box for every case, in place of its stored or sidecar boxes "
                        "(repeatable): 'x0 y0 x1 y1' or 'x0 y0 z0 x1 y1 z1' in pixels/voxels")
    p.add_argument("--modality", metavar="NAME",
                   help="modality of every NIfTI and DICOM case, over sidecars and DICOM "
                        "tags: CT is windowed in HU, any other name takes the non-CT rule "
                        "(percentiles for volumes; see rep_medsam_jax/io). Default: the "
                        "sidecar's 'modality', then the DICOM Modality tag")
    p.add_argument("--ct-window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"),
                   help="CT window in HU for every CT case, over sidecars (default 40 400)")
    p.add_argument("--int8", action="store_true",
                   help="use the export's int8 encoder (written by export --int8): about "
                        "half the encoder time, masks close to but not equal to fp32")
    p.add_argument("--overlay", metavar="PNG_DIR", help="also write overlay PNGs here")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rep_medsam_jax.metrics import evaluate_folder  # noqa: PLC0415

    rows = evaluate_folder(args.pred, args.gt, args.output)
    if rows:
        dsc = sum(r["dsc"] for r in rows) / len(rows)
        nsd = sum(r["nsd"] for r in rows) / len(rows)
        print(f"{len(rows)} case(s): mean DSC {dsc:.4f}, mean NSD {nsd:.4f} -> {args.output}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="DSC and NSD of predictions against ground truth",
                       description="The challenge metrics (compute_metrics.py): per case DSC and "
                                   "NSD (tolerance 2, NSD only when DSC > 0.2).")
    p.add_argument("--pred", required=True,
                   help="folder of predictions (.npz key segs, .nii.gz, .png), named as the GT")
    p.add_argument("--gt", required=True,
                   help="folder of ground truth (.npz key gts, .nii.gz, .png label maps)")
    p.add_argument("-o", "--output", default="metrics.csv", help="CSV to write")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_models(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    root = model_store.store_root()
    print(f"model store: {root} (set {model_store.ENV_VAR} to change)")
    for kind in ("models", "exports"):
        names = model_store.installed(kind)
        print(f"{kind}:" + ("" if names else " none"))
        for name in names:
            folder = root / kind / name
            try:
                info = json.loads((folder / model_store.MARKERS[kind]).read_text())
            except (OSError, ValueError):
                info = {}
            model = info.get("model") if isinstance(info, dict) else None
            model = model if isinstance(model, dict) else {}
            variant = model.get("encoder_variant") or model.get("encoder") or "?"
            extra = " +int8" if kind == "exports" and "int8" in info else ""
            print(f"  {name:24s} {variant}{extra}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model store",
                       description="List the model directories and exports in the model store "
                                   f"(${model_store.ENV_VAR}, default ~/.cache/rep_medsam_jax); "
                                   "add to it with convert/export --name NAME.")
    p.set_defaults(func=_cmd_models)


def _cmd_app(args: argparse.Namespace) -> int:
    try:
        from rep_medsam_jax.app.launch import serve  # noqa: PLC0415
    except ImportError as err:
        raise ValueError(f"the app needs its extra: pip install 'rep-medsam-jax[app]' "
                         f"({err})") from None
    serve(args.paths, args.model, args.backend, host=args.host, port=args.port,
          threads=args.threads, int8=args.int8, cache_mb=args.cache_mb,
          max_upload_mb=args.max_upload_mb, open_browser=args.open)
    return 0


def _add_app(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="local web page: draw a box, get the mask",
                       description="Serve a local web page (127.0.0.1, a random token in the "
                                   "URL) to segment images and volumes by drawing boxes; "
                                   "see docs/app.md.")
    p.add_argument("paths", nargs="*", metavar="FILE_OR_FOLDER",
                   help="files and folders the page may open (nothing else is readable); "
                        "files can also be uploaded in the page")
    p.add_argument("--model", required=True,
                   help="EXPORT_DIR (onnx, openvino) or MODEL_DIR (jax), or a model store name")
    p.add_argument("--backend", choices=("onnx", "openvino", "jax"),
                   help="default: onnx for an export, jax for a model directory")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--int8", action="store_true", help="use the export's int8 encoder")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--cache-mb", type=int, default=1024,
                   help="slice-embedding cache size in MiB (default 1024)")
    p.add_argument("--max-upload-mb", type=int, default=1024,
                   help="largest upload in MiB (default 1024)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.set_defaults(func=_cmd_app)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_convert, _add_export, _add_predict, _add_evaluate, _add_models, _add_app]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rep-medsam", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


# Errors a user can act on: print one clear line, exit 2, no traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as err:
        print(f"rep-medsam {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
