"""benchmarks/record.py: what the benchmark scripts write under benchmarks/results/."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

# Loaded from its file, not by putting benchmarks/ on sys.path: there benchmarks/input_pipeline.py
# would shadow the input_pipeline package for every later test in this process and for the
# grain worker processes it starts.
_SPEC = importlib.util.spec_from_file_location(
    "benchmark_record", Path(__file__).resolve().parents[1] / "benchmarks" / "record.py")
record = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(record)


def test_recorded_output_keeps_what_was_printed_after_a_header(tmp_path, capsys):
    out = tmp_path / "sub" / "run.txt"
    with record.recorded_output(out):
        print("encoder 1.00x")
        print("decoder 0.50x")
    text = out.read_text().splitlines()
    header = [line for line in text if line.startswith("# ")]
    assert [line.split(":")[0] for line in header] == [
        "# command", "# commit", "# machine", "# python", "# time"]
    assert text[len(header):] == ["encoder 1.00x", "decoder 0.50x"]
    assert "encoder 1.00x" in capsys.readouterr().out          # still printed
    assert sys.stdout is not None and not isinstance(sys.stdout, record._Tee)


def test_a_failed_run_writes_nothing(tmp_path):
    out = tmp_path / "run.txt"
    with pytest.raises(RuntimeError):
        with record.recorded_output(out):
            print("half a report")
            raise RuntimeError("benchmark failed")
    assert list(tmp_path.iterdir()) == []
    assert not isinstance(sys.stdout, record._Tee)


def test_out_option_default_explicit_and_none(tmp_path):
    default = record.resolve_out(None, "predict")
    assert default.parent == record.RESULTS and default.name.startswith("predict-")
    assert default.suffix == ".txt"
    assert record.resolve_out(str(tmp_path / "x.txt"), "predict") == tmp_path / "x.txt"
    assert record.resolve_out("-", "predict") is None
    with record.recorded_output(None):
        print("not kept")


def test_write_json_wraps_rows_with_the_run_header(tmp_path):
    out = tmp_path / "rows.json"
    record.write_json(out, [{"step": "seg", "images_per_s": 1.5}])
    data = json.loads(out.read_text())
    assert data["rows"] == [{"step": "seg", "images_per_s": 1.5}]
    assert set(data["run"]) == {"command", "commit", "machine", "python", "time"}
