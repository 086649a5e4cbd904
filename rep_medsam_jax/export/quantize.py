"""Static per-channel int8 (QDQ) quantisation of the exported encoder, with its cost measured.

Dynamic int8 quantises activations at run time, which costs more than it saves for
convolutions on CPU (onnxruntime's quantization guide recommends static quantization for CNNs),
so it is not offered. The int8 encoder is an extra file; the fp32 encoder stays the default.

The recipe (:class:`Int8Recipe`) says which ops become int8 and which nodes stay float. Only
the convolutions are worth quantising: they are the run time. Quantising everything else too
(the decomposed LayerNorms of the neck, where a squared deviation in uint8 loses the variance;
the tiny squeeze-excite gates, 1x1 convs on a pooled vector; residual Adds) costs accuracy and
buys no speed. The squeeze-excite gates stay float as well; the stem and neck convolutions are
int8 (keeping them float takes 1.19x the time for a slightly smaller embedding error), and
activation ranges cut the 0.01 % tails (percentile calibration) instead of stretching to
outliers (MinMax): see docs/benchmarks.md for the measured table
behind the default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from rep_medsam_jax.export.graph_passes import tensor_readers
from rep_medsam_jax.predictor.onnx_backend import PROVIDERS
from rep_medsam_jax.preprocess import STUDENT_SIZE, preprocess_image

PHANTOM_MODALITIES = ("CT", "MR", "Endoscopy", "Dermoscopy", "Microscopy")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Named groups of encoder nodes that a recipe can keep in float (see `sensitive_nodes`).
NODE_GROUPS = ("stem", "se", "neck")


class CalibrationDataError(ValueError):
    """No usable calibration image in the given folder."""


@dataclasses.dataclass(frozen=True)
class Int8Recipe:
    """How the encoder is quantised (every field is recorded in export.json).

    calibration: "minmax" | "percentile" | "entropy" (activation ranges from the calibration
        images); percentile: the kept share of values for "percentile" (both tails cut).
    op_types: ONNX op types that may become int8. keep_float: groups of `NODE_GROUPS` whose
        nodes stay float even when their op type is listed.
    quant_format: "QDQ" (QuantizeLinear/DequantizeLinear pairs, fused by onnxruntime) or
        "QOperator" (QLinearConv etc. written out).
    per_channel: one weight scale per output channel (needed for folded-BN depthwise kernels,
        whose channels differ by orders of magnitude). reduce_range: 7-bit weights.
    activation_symmetric / weight_symmetric: zero-centred ranges (int8 activations when
        symmetric, uint8 otherwise).
    """

    calibration: str = "percentile"
    percentile: float = 99.99
    op_types: tuple[str, ...] = ("Conv",)
    keep_float: tuple[str, ...] = ("se",)
    quant_format: str = "QDQ"
    per_channel: bool = True
    reduce_range: bool = False
    activation_symmetric: bool = False
    weight_symmetric: bool = True

    def __post_init__(self):
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"calibration must be one of {CALIBRATION_METHODS}, "
                             f"got {self.calibration!r}")
        unknown = set(self.keep_float) - set(NODE_GROUPS)
        if unknown:
            raise ValueError(f"unknown node group(s) {sorted(unknown)}; known: {NODE_GROUPS}")
        if self.quant_format not in ("QDQ", "QOperator"):
            raise ValueError("quant_format must be 'QDQ' or 'QOperator', "
                             f"got {self.quant_format!r}")

    def as_json(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        calibration = (f"percentile {self.percentile:g}" if self.calibration == "percentile"
                       else self.calibration)
        activations = "int8 symmetric" if self.activation_symmetric else "uint8"
        return (f"static {self.quant_format}, {'+'.join(self.op_types)} only, "
                f"{'per-channel' if self.per_channel else 'per-tensor'} "
                f"{'7-bit' if self.reduce_range else 'int8'} weights, {activations} "
                f"activations, {calibration} calibration, float: "
                f"{', '.join(self.keep_float) or 'nothing'}")


# Measured on random full-size weights and on the trained demo model (docs/benchmarks.md):
# Conv-only with 99.99-percentile ranges gives the smallest embedding error. Quantising the stem
# and neck convolutions as well (against keeping them float): full size 0.84x the time (172 vs
# 207 ms), embedding error 4.75 % instead of 4.49 %, phantom mask DSC vs fp32 0.752 vs 0.754;
# trained demo model (24 cases) DSC 0.921 vs 0.917, embedding error 3.35 % vs 3.17 %. The SE
# gates (1x1 convs on a pooled vector) stay float, by name.
DEFAULT_RECIPE = Int8Recipe()
# Every quantisable op with MinMax ranges: DSC 0.69 on random full-size weights. Kept as the
# baseline the default recipe is measured against.
QUANTIZE_EVERYTHING = Int8Recipe(calibration="minmax", op_types=(), keep_float=())


# --------------------------------------------------------------------------- calibration data

def phantom_cases(count: int, seed: int = 1234, size: int = 256) -> list[tuple]:
    """Generated 2D cases ``(image (H, W, 3) uint8, gts, boxes (N, 4))`` of mixed modalities."""
    from input_pipeline.phantoms import make_case_2d  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    return [make_case_2d(rng, PHANTOM_MODALITIES[i % len(PHANTOM_MODALITIES)], size)
            for i in range(count)]


def _read_for_calibration(path: Path):
    """Read one case; plain images need no boxes for calibration, so a missing sidecar is no
    reason to skip them."""
    from rep_medsam_jax.io.cases import read_case  # noqa: PLC0415
    from rep_medsam_jax.io.errors import MissingBoxesError  # noqa: PLC0415

    try:
        return read_case(path)
    except MissingBoxesError:
        is_volume = path.is_dir() or ".nii" in path.name.lower()    # NIfTI or DICOM series
        box = [[0, 0, 0, 1, 1, 1]] if is_volume else [[0, 0, 1, 1]]
        return read_case(path, box)


def load_calibration_images(folder: str | Path | None, count: int = 16,
                            size: int = STUDENT_SIZE) -> np.ndarray:
    """(count', size, size, 3) float32 model inputs from a folder of cases, or from phantoms.

    Up to 4 evenly spaced slices per 3D case. A file that cannot be read (corrupt, wrong type,
    unreadable) is skipped with a warning; :class:`CalibrationDataError` when none is usable.
    """
    images = []
    if folder is not None:
        from rep_medsam_jax.io.cases import discover_cases  # noqa: PLC0415

        skipped = []
        for path in discover_cases(folder):
            try:
                case = _read_for_calibration(path)
                slices = ([case.image[z] for z in np.linspace(0, len(case.image) - 1, 4)
                           .astype(int)] if case.is_3d else [case.image])
                images.extend(preprocess_image(image, size)[0] for image in slices)
            except Exception as err:  # noqa: BLE001 - one bad file must not stop calibration
                skipped.append(path.name)
                warnings.warn(f"calibration: skipping {path}: {type(err).__name__}: {err}",
                              stacklevel=2)
                continue
            if len(images) >= count:
                break
        if not images:
            detail = f" ({len(skipped)} unreadable: {', '.join(skipped[:5])})" if skipped else ""
            raise CalibrationDataError(f"{folder}: no usable case or image for int8 "
                                       f"calibration{detail}")
    else:
        images = [preprocess_image(image, size)[0] for image, _, _ in phantom_cases(count)]
    return np.stack(images[:count]).astype(np.float32)


def _resize_inputs(images: np.ndarray, size: int) -> np.ndarray:
    """(B, S', S', 3) preprocessed inputs -> (B, size, size, 3): the padded square scales
    as a whole, so this matches preprocessing at ``size`` up to interpolation."""
    if images.shape[1:3] == (size, size):
        return images
    import cv2  # noqa: PLC0415

    return np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
                     for image in images]).astype(np.float32)


class _Reader:
    """onnxruntime CalibrationDataReader over an array of images, one per batch."""

    def __init__(self, input_name: str, images: np.ndarray):
        self._items = iter([{input_name: image[None]} for image in images])

    def get_next(self):
        return next(self._items, None)


# --------------------------------------------------------------------------- graph analysis

def _through_layout(tensor: str, consumers: dict) -> list[str]:
    """``tensor`` and the outputs of Transposes / Reshapes applied to it (layout changes)."""
    names = [tensor]
    for node in consumers.get(tensor, []):
        if node.op_type in ("Transpose", "Reshape"):
            names.extend(_through_layout(node.output[0], consumers))
    return names


def _is_layernorm_input(tensor: str, consumers: dict) -> bool:
    """A decomposed LayerNorm starts with ``mean = ReduceMean(x)`` and ``x - mean``."""
    for node in consumers.get(tensor, []):
        if node.op_type == "ReduceMean":
            mean = node.output[0]
            if any(c.op_type == "Sub" and tensor in c.input and mean in c.input
                   for c in consumers.get(mean, [])):
                return True
    return False


def _descendants(graph, start_nodes: list, consumers: dict) -> list:
    seen, stack = {id(n) for n in start_nodes}, list(start_nodes)
    found = list(start_nodes)
    while stack:
        for output in stack.pop().output:
            for node in consumers.get(output, []):
                if id(node) not in seen:
                    seen.add(id(node))
                    found.append(node)
                    stack.append(node)
    order = {id(n): i for i, n in enumerate(graph.node)}
    return sorted(found, key=lambda n: order[id(n)])


def _squeeze_excite_nodes(graph, consumers: dict) -> list:
    """Nodes of every SE gate, from the spatial mean to the Mul that applies the gate (the Mul
    included): ReduceMean -> Gemm -> Relu -> Gemm -> Sigmoid (-> broadcast) -> Mul as jax2onnx
    writes it, or GlobalAveragePool -> 1x1 Conv -> Relu -> 1x1 Conv -> Sigmoid -> Resize -> Mul
    after the exporter's blocked-layout rewrite (graph_passes.py)."""
    found = []
    for node in graph.node:
        if node.op_type not in ("ReduceMean", "GlobalAveragePool"):
            continue
        if node.op_type == "ReduceMean" and _is_layernorm_input(node.input[0], consumers):
            continue
        gate, frontier = [node], [node]
        while frontier:
            current = frontier.pop()
            for nxt in consumers.get(current.output[0], []):
                if nxt in gate:
                    continue
                gate.append(nxt)
                if nxt.op_type != "Mul":            # the Mul applies the gate: stop there
                    frontier.append(nxt)
        if any(n.op_type == "Sigmoid" for n in gate):
            found.extend(gate)
    return found


def sensitive_nodes(model) -> dict[str, list[str]]:
    """Names of the encoder nodes in each of `NODE_GROUPS`, found by structure (not by name):

    stem: the first Conv (sees the raw [0, 1] image, 3 input channels).
    se: the squeeze-excite gates (spatial mean ... Sigmoid -> Mul): 1x1 convs on a 1x1 map
        after the exporter's rewrite, tiny and run once per image, so worth no int8 rounding.
    neck: from the first Conv whose output feeds a decomposed LayerNorm to the graph output
        (neck convs, both LayerNorms, the last conv): the embedding the decoder reads.
    """
    graph = model.graph
    consumers = tensor_readers(graph)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    neck_convs = [n for n in convs
                  if any(_is_layernorm_input(t, consumers)
                         for t in _through_layout(n.output[0], consumers))]
    neck = _descendants(graph, neck_convs[:1], consumers) if neck_convs else []
    return {"stem": [convs[0].name] if convs else [],
            "se": [n.name for n in _squeeze_excite_nodes(graph, consumers)],
            "neck": [n.name for n in neck]}


def _name_unnamed_nodes(model) -> None:
    """Exclusion works by node name; give every node one."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_unnamed_{index}"


# --------------------------------------------------------------------------- measurement

def _interleaved_latency(sessions: list, image: np.ndarray, repeats: int = 5) -> list[float]:
    """Median latency of each session, runs interleaved so that load from other processes
    hits all of them alike."""
    names = [s.get_inputs()[0].name for s in sessions]
    for session, name in zip(sessions, names):
        session.run(None, {name: image})
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for session, name, record in zip(sessions, names, times):
            start = time.perf_counter()
            session.run(None, {name: image})
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def predict_cases(backend, cases) -> list[np.ndarray]:
    """Label maps of ``backend`` on ``cases`` (image, gts, boxes)."""
    from rep_medsam_jax.predictor.cases import predict_2d  # noqa: PLC0415

    return [predict_2d(backend, image, boxes) for image, _, boxes in cases]


def label_agreement(reference: list[np.ndarray], other: list[np.ndarray],
                    box_counts: list[int]) -> float:
    """Mean DSC per label between two lists of label maps (labels empty in both skipped)."""
    from rep_medsam_jax.metrics import dice  # noqa: PLC0415

    scores = []
    for a, b, count in zip(reference, other, box_counts):
        for label in range(1, count + 1):
            if np.any(a == label) or np.any(b == label):
                scores.append(dice(a == label, b == label))
    return float(np.mean(scores)) if scores else 1.0


def mask_agreement(fp32_backend, int8_backend, cases) -> float:
    """Mean DSC per label between the masks of two backends on the same cases."""
    counts = [len(boxes) for _, _, boxes in cases]
    return label_agreement(predict_cases(fp32_backend, cases),
                           predict_cases(int8_backend, cases), counts)


# --------------------------------------------------------------------------- quantisation

def prepare_for_quantization(fp32_path: Path, prepared_path: Path) -> None:
    """onnxruntime's pre-processing (shape inference, graph clean-up) + named nodes."""
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    quant_pre_process(str(fp32_path), str(prepared_path), skip_symbolic_shape=True)
    model = onnx.load(str(prepared_path))
    _name_unnamed_nodes(model)
    onnx.save(model, str(prepared_path))


# Histogram bins for the entropy calibrator: onnxruntime's default (128, the same as its
# quantised bins) leaves a single candidate threshold, which makes "entropy" plain MinMax.
ENTROPY_BINS = 2048
CALIBRATION_CHUNK = 4


def _calibration_method(recipe: Int8Recipe):
    from onnxruntime.quantization import CalibrationMethod  # noqa: PLC0415

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[recipe.calibration]


def calibrate(prepared_path: Path, calibration_images: np.ndarray, recipe: Int8Recipe,
              ranges_path: Path) -> None:
    """Run the calibration images through the prepared model; write the activation ranges
    (onnxruntime's calibration-cache JSON) to ``ranges_path``."""
    import onnxruntime as ort  # noqa: PLC0415
    from onnxruntime.quantization.calibrate import (create_calibrator,  # noqa: PLC0415
                                                    save_tensors_data)

    session = ort.InferenceSession(str(prepared_path), providers=PROVIDERS)
    size = session.get_inputs()[0].shape[1]
    images = (_resize_inputs(calibration_images, size) if isinstance(size, int)
              else calibration_images)
    options = {"symmetric": recipe.activation_symmetric}
    if recipe.calibration == "percentile":
        options["percentile"] = recipe.percentile
    if recipe.calibration == "entropy":
        options["num_bins"] = ENTROPY_BINS
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        # (the histogram calibrators print per-tensor progress to stdout)
        calibrator = create_calibrator(
            Path(prepared_path), list(recipe.op_types) or None,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=_calibration_method(recipe),
            providers=PROVIDERS, extra_options=options)
        # A few images at a time: the calibrator holds every intermediate tensor of the images
        # it is given (GBs for the full-size encoder); histograms and min/max merge across calls.
        for start in range(0, len(images), CALIBRATION_CHUNK):
            calibrator.collect_data(_Reader(session.get_inputs()[0].name,
                                            images[start:start + CALIBRATION_CHUNK]))
        save_tensors_data(calibrator.compute_data(), ranges_path)


def quantize_prepared(prepared_path: Path, int8_path: Path, calibration_images: np.ndarray,
                      recipe: Int8Recipe = DEFAULT_RECIPE,
                      ranges_path: Path | None = None) -> dict[str, list[str]]:
    """Quantise a prepared encoder with ``recipe``; returns the float-kept nodes by group.

    ranges_path: where the activation ranges are kept; an existing file is reused without
        calibrating (it must come from the same calibration settings and images), so that
        several recipes can share one calibration pass.
    """
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static  # noqa

    groups = sensitive_nodes(onnx.load(str(prepared_path)))
    kept = {group: groups[group] for group in recipe.keep_float}
    excluded = sorted({name for names in kept.values() for name in names})
    with tempfile.TemporaryDirectory() as tmp:
        ranges = Path(ranges_path) if ranges_path else Path(tmp) / "ranges.json"
        if not ranges.is_file():
            calibrate(prepared_path, calibration_images, recipe, ranges)
        quantize_static(
            str(prepared_path), str(int8_path), None,
            quant_format=QuantFormat.QDQ if recipe.quant_format == "QDQ" else QuantFormat.QOperator,
            op_types_to_quantize=list(recipe.op_types) or None, nodes_to_exclude=excluded,
            per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
            activation_type=QuantType.QInt8 if recipe.activation_symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=_calibration_method(recipe),
            extra_options={"ActivationSymmetric": recipe.activation_symmetric,
                           "WeightSymmetric": recipe.weight_symmetric},
            calibration_cache_path=str(ranges))
    return kept


def quantize_encoder(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray | None,
                     decoder_path: Path, image_size: int = 256, agreement_cases: int = 8,
                     recipe: Int8Recipe = DEFAULT_RECIPE, source_path: Path | None = None) -> dict:
    """Write ``int8_path``; return the recipe, the float-kept nodes, calibration size, the
    speed ratio and the mask agreement with fp32 (mean DSC on generated cases).

    source_path: the graph to quantise when it is not ``fp32_path`` itself (the exporter
        quantises jax2onnx's graph before its layout rewrites); ``fp32_path`` stays the
        reference for speed and agreement.
    """
    import onnxruntime as ort  # noqa: PLC0415

    from rep_medsam_jax.predictor.onnx_backend import OnnxBackend, session_options  # noqa

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if calibration_images is None:
        calibration_images = load_calibration_images(None, size=image_size)
    calibration_images = _resize_inputs(np.asarray(calibration_images, np.float32), image_size)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        prepare_for_quantization(Path(source_path or fp32_path), prepared)
        kept = quantize_prepared(prepared, int8_path, calibration_images, recipe)

    sessions = [ort.InferenceSession(str(path), session_options(), providers=PROVIDERS)
                for path in (fp32_path, int8_path)]
    t_fp32, t_int8 = _interleaved_latency(sessions, calibration_images[:1])
    cases = phantom_cases(agreement_cases, seed=99)
    agreement = mask_agreement(OnnxBackend(fp32_path, decoder_path, image_size),
                               OnnxBackend(int8_path, decoder_path, image_size), cases)
    return {"file": int8_path.name, "calibration_images": int(len(calibration_images)),
            "scheme": recipe.describe(), "recipe": recipe.as_json(),
            "calibration_method": recipe.calibration,
            "float_nodes": kept,
            "latency_fp32_s": t_fp32, "latency_int8_s": t_int8,
            "speed_ratio_int8_over_fp32": t_int8 / t_fp32,
            "mask_dsc_int8_vs_fp32": agreement, "agreement_cases": agreement_cases}
