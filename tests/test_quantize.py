"""int8 quantisation of the encoder: sensitive nodes found by structure and kept float, the
calibration methods, the measured agreement, and calibration folders with bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rep_medsam_jax.export import quantize as q
from rep_medsam_jax.models.config import REPVIT_VARIANTS


@pytest.fixture(scope="module")
def prepared(tiny_export_dir, tmp_path_factory):
    """The tiny encoder after onnxruntime's quantisation pre-processing: (path, onnx model)."""
    import onnx

    path = tmp_path_factory.mktemp("quant") / "prepared.onnx"
    q.prepare_for_quantization(tiny_export_dir / "encoder.onnx", path)
    return path, onnx.load(str(path))


@pytest.fixture(scope="module")
def calibration():
    return q.load_calibration_images(None, count=2)


def _producers(model) -> dict:
    return {output: node for node in model.graph.node for output in node.output}


def _weight_is_quantized(model, conv) -> bool:
    """In QDQ form a quantised Conv reads its weight from a DequantizeLinear."""
    producer = _producers(model).get(conv.input[1])
    return producer is not None and producer.op_type == "DequantizeLinear"


def _kernel_size(model, conv) -> tuple[int, ...]:
    from onnx import numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    return numpy_helper.to_array(weights[conv.input[1]]).shape[2:]


def test_sensitive_nodes_are_found_by_structure(prepared):
    _, model = prepared
    groups = q.sensitive_nodes(model)
    by_name = {node.name: node for node in model.graph.node}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]

    assert groups["stem"] == [convs[0].name]
    assert _kernel_size(model, convs[0]) == (3, 3)             # RepViT stem: conv 3x3, 3 -> C/2

    # SAM's neck: Conv 1x1 -> LayerNorm2d -> Conv 3x3 -> LayerNorm2d, ending at the output.
    neck = [by_name[name] for name in groups["neck"]]
    assert [_kernel_size(model, n) for n in neck if n.op_type == "Conv"] == [(1, 1), (3, 3)]
    assert [n.op_type for n in neck].count("Sqrt") == 2
    assert model.graph.output[0].name in {out for n in neck for out in n.output}

    # One gate per SE row of the config (row[3] is the SE flag), each ending in its Mul; after
    # the exporter's rewrite a gate is GlobalAveragePool -> 1x1 Conv -> Relu -> 1x1 Conv ->
    # Sigmoid -> Resize -> Mul, its convs reading the pooled (B, C, 1, 1) map.
    se = [by_name[name] for name in groups["se"]]
    se_rows = sum(row[3] for row in REPVIT_VARIANTS["rep_medsam_tiny"].rows)
    assert [n.op_type for n in se].count("Sigmoid") == se_rows == 4
    assert [n.op_type for n in se].count("GlobalAveragePool") == se_rows
    assert [n.op_type for n in se].count("Mul") == se_rows
    assert [n.op_type for n in se].count("Conv") == 2 * se_rows
    pooled = {n.output[0] for n in se if n.op_type == "GlobalAveragePool"}
    relus = {n.output[0] for n in se if n.op_type == "Relu"}
    assert all(n.input[0] in pooled | relus for n in se if n.op_type == "Conv")
    assert not {n.op_type for n in se} & {"Sqrt", "Sub"}             # no LayerNorm


ALL_GROUPS_FLOAT = q.Int8Recipe(keep_float=("stem", "se", "neck"))


def _check_float_groups(prepared, calibration, tmp_path, recipe):
    """Quantise with ``recipe``: the convs of its float groups keep float weights, every other
    conv gets int8 weights, and no LayerNorm / SE result is rounded to int8."""
    import onnx

    path, model = prepared
    groups = q.sensitive_nodes(model)
    conv_names = {node.name for node in model.graph.node if node.op_type == "Conv"}
    float_convs = set().union(*(set(groups[group]) & conv_names for group in recipe.keep_float))

    kept = q.quantize_prepared(path, tmp_path / "int8.onnx", calibration, recipe)
    assert set(kept) == set(recipe.keep_float)
    int8 = onnx.load(str(tmp_path / "int8.onnx"))
    convs = [node for node in int8.graph.node if node.op_type == "Conv"]
    assert len(convs) == sum(node.op_type == "Conv" for node in model.graph.node)
    for conv in convs:
        assert _weight_is_quantized(int8, conv) == (conv.name not in float_convs), conv.name
    # Only body convolutions are quantised: no LayerNorm / SE result is rounded to int8.
    consumers = {name: n.op_type for n in int8.graph.node for name in n.input}
    for node in int8.graph.node:
        if node.op_type in ("Sqrt", "Sub", "Sigmoid", "ReduceMean", "GlobalAveragePool",
                            "Resize"):
            assert consumers.get(node.output[0]) != "QuantizeLinear", node.name
    return groups, float_convs


def test_float_groups_stay_float_and_the_rest_is_int8(prepared, calibration, tmp_path):
    _, float_convs = _check_float_groups(prepared, calibration, tmp_path, ALL_GROUPS_FLOAT)
    assert len(float_convs) == 3 + 2 * 4                     # stem, 2 neck, 2 per SE gate


def test_default_recipe_keeps_only_the_squeeze_excite_gates_float(prepared, calibration,
                                                                  tmp_path):
    """The default quantises the stem and neck convs too (0.84x the time at full size)."""
    assert q.DEFAULT_RECIPE.keep_float == ("se",)
    groups, float_convs = _check_float_groups(prepared, calibration, tmp_path, q.DEFAULT_RECIPE)
    assert len(float_convs) == 2 * 4                         # 2 per SE gate, nothing else
    assert groups["stem"] and not float_convs & (set(groups["stem"]) | set(groups["neck"]))


def test_quantize_everything_recipe_does_quantize_the_neck(prepared, calibration, tmp_path):
    """The contrast: without exclusions the same neck convs do get int8 weights."""
    import onnx

    path, model = prepared
    conv_names = {node.name for node in model.graph.node if node.op_type == "Conv"}
    neck_convs = set(q.sensitive_nodes(model)["neck"]) & conv_names
    q.quantize_prepared(path, tmp_path / "all.onnx", calibration, q.QUANTIZE_EVERYTHING)
    int8 = onnx.load(str(tmp_path / "all.onnx"))
    by_name = {node.name: node for node in int8.graph.node}
    assert neck_convs and all(_weight_is_quantized(int8, by_name[n]) for n in neck_convs)


def _ranges(path) -> dict[str, tuple[float, float]]:
    def scalar(value):
        value = value["data"] if isinstance(value, dict) else value
        return float(np.ravel(value)[0])

    data = json.loads(path.read_text())["data"]
    return {name: (scalar(item["lowest"]), scalar(item["highest"])) for name, item in data.items()}


def test_calibration_methods_give_different_ranges(prepared, calibration, tmp_path,
                                                   monkeypatch):
    path, _ = prepared

    def ranges(method, name):
        q.calibrate(path, calibration, q.Int8Recipe(calibration=method, percentile=99.0),
                    tmp_path / f"{name}.json")
        return _ranges(tmp_path / f"{name}.json")

    def clipped(found):
        return sum(found[t] != minmax[t] for t in minmax)

    minmax = ranges("minmax", "minmax")
    percentile = ranges("percentile", "percentile")
    monkeypatch.setattr(q, "ENTROPY_BINS", 128)         # onnxruntime's own default
    entropy_default_bins = ranges("entropy", "entropy128")
    monkeypatch.setattr(q, "ENTROPY_BINS", 256)         # > the 128 quantised bins; fast
    entropy = ranges("entropy", "entropy256")
    # Every range lies within the min/max of the same images...
    for found in (percentile, entropy, entropy_default_bins):
        assert found.keys() == minmax.keys()
        assert all(minmax[t][0] - 1e-6 <= lo and hi <= minmax[t][1] + 1e-6
                   for t, (lo, hi) in found.items())
    # ...percentile 99 clips most tensors; entropy clips some, but only with more histogram
    # bins than quantised bins (with 128 it has one candidate threshold: plain MinMax).
    assert clipped(percentile) > len(minmax) // 2
    assert clipped(entropy_default_bins) == 0 < clipped(entropy)


def test_quantize_encoder_reports_agreement_speed_and_recipe(tiny_export_dir, calibration,
                                                             tmp_path):
    meta = q.quantize_encoder(tiny_export_dir / "encoder.onnx", tmp_path / "encoder_int8.onnx",
                              calibration, tiny_export_dir / "decoder.onnx", 256,
                              agreement_cases=2)
    assert (tmp_path / "encoder_int8.onnx").is_file()
    assert meta["calibration_images"] == 2 and meta["agreement_cases"] == 2
    assert meta["calibration_method"] == q.DEFAULT_RECIPE.calibration
    assert meta["recipe"]["keep_float"] == list(q.DEFAULT_RECIPE.keep_float)
    assert set(meta["float_nodes"]) == set(q.DEFAULT_RECIPE.keep_float)
    assert meta["float_nodes"]["se"]
    assert 0.0 <= meta["mask_dsc_int8_vs_fp32"] <= 1.0
    assert meta["speed_ratio_int8_over_fp32"] == pytest.approx(
        meta["latency_int8_s"] / meta["latency_fp32_s"])
    json.dumps(meta)                                             # export.json can hold it


def test_mask_agreement_of_a_backend_with_itself_is_one(tiny_export_dir):
    from rep_medsam_jax.predictor.onnx_backend import OnnxBackend

    backend = OnnxBackend(tiny_export_dir / "encoder.onnx", tiny_export_dir / "decoder.onnx")
    assert q.mask_agreement(backend, backend, q.phantom_cases(1, seed=5)) == 1.0


def test_label_agreement_hand_values():
    a = np.array([[1, 1, 0, 2]])
    b = np.array([[1, 0, 0, 0]])
    # label 1: 2*1/(2+1); label 2: present in a only -> 0; label 3: in neither -> skipped.
    assert q.label_agreement([a], [b], [3]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_recipe_rejects_unknown_settings():
    with pytest.raises(ValueError, match="node group"):
        q.Int8Recipe(keep_float=("decoder",))
    with pytest.raises(ValueError, match="calibration"):
        q.Int8Recipe(calibration="kl")


def _good_npz(path, size=(40, 50)):
    rng = np.random.default_rng(3)
    np.savez(path, imgs=rng.integers(0, 256, size + (3,), dtype=np.uint8),
             boxes=np.array([[2, 2, 20, 20]]))


def test_bad_calibration_files_are_skipped_with_a_warning(tmp_path, monkeypatch):
    import cv2

    _good_npz(tmp_path / "2DBox_good.npz")
    cv2.imwrite(str(tmp_path / "plain.png"), np.full((30, 20), 90, np.uint8))   # no sidecar
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "2DBox_broken.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip")
    _good_npz(tmp_path / "2DBox_locked.npz")

    from rep_medsam_jax.io import cases

    real_read = cases.read_case

    def read_case(path, *args, **kwargs):            # an error that is not a ValueError
        if "locked" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(cases, "read_case", read_case)
    with pytest.warns(UserWarning, match="calibration: skipping") as record:
        images = q.load_calibration_images(tmp_path, count=8, size=64)
    skipped = " ".join(str(w.message) for w in record)
    for name in ("broken.png", "2DBox_broken.npz", "broken.nii.gz", "PermissionError"):
        assert name in skipped
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.float32   # good npz + png
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_a_folder_without_usable_calibration_files_is_a_clear_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    (tmp_path / "2DBox_broken.npz").write_bytes(b"garbage")
    expected = r"no usable .*\(2 unreadable: 2DBox_broken.npz, broken.png\)"
    with pytest.warns(UserWarning), pytest.raises(q.CalibrationDataError, match=expected):
        q.load_calibration_images(tmp_path)


def test_calibration_inputs_follow_the_model_size():
    assert q.load_calibration_images(None, count=2, size=64).shape == (2, 64, 64, 3)
    resized = q._resize_inputs(np.ones((1, 256, 256, 3), np.float32), 64)
    np.testing.assert_allclose(resized, 1.0)
    assert resized.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_export_command_calibrates_on_a_folder_skipping_bad_files(tiny_model_dir, tmp_path):
    """``rep-medsam export --int8 --calibration DIR``: the folder's readable cases (read at the
    model's input size), an unreadable one skipped with a warning."""
    from rep_medsam_jax.cli import main

    folder = tmp_path / "calibration"
    folder.mkdir()
    _good_npz(folder / "2DBox_a.npz")
    _good_npz(folder / "2DBox_b.npz")
    (folder / "2DBox_broken.npz").write_bytes(b"garbage")
    out = tmp_path / "export"
    with pytest.warns(UserWarning, match="2DBox_broken.npz"):
        assert main(["export", str(tiny_model_dir), "-o", str(out), "--int8",
                     "--calibration", str(folder)]) == 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["int8"]["calibration_images"] == 2
    assert (out / "encoder_int8.onnx").is_file()


def test_predict_int8_runs_the_int8_encoder_and_refuses_without_one(tiny_export_dir,
                                                                     calibration, tmp_path):
    import shutil

    from rep_medsam_jax.predictor.backend import open_backend
    from rep_medsam_jax.predictor.onnx_backend import OnnxBackend

    export = tmp_path / "export"
    shutil.copytree(tiny_export_dir, export)
    with pytest.raises(ValueError, match="export --int8|--int8"):
        open_backend(export, "onnx", int8=True)                  # no int8 encoder yet
    q.quantize_encoder(export / "encoder.onnx", export / "encoder_int8.onnx", calibration,
                       export / "decoder.onnx", 256, agreement_cases=1)
    with pytest.raises(ValueError, match="--backend onnx"):
        open_backend(export, "jax", int8=True)

    images = calibration[:1]
    fp32 = OnnxBackend(export / "encoder.onnx", export / "decoder.onnx").encode(images)
    int8 = OnnxBackend(export / "encoder_int8.onnx", export / "decoder.onnx").encode(images)
    assert np.abs(int8 - fp32).max() > 1e-4            # the two encoders are distinguishable
    np.testing.assert_array_equal(open_backend(export, "onnx", int8=True).encode(images), int8)
    np.testing.assert_array_equal(open_backend(export, "onnx").encode(images), fp32)
