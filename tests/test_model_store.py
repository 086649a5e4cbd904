"""The model store (rep_medsam_jax.model_store) and the CLI's --name / store-name arguments."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rep_medsam_jax import model_store


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "store"
    monkeypatch.setenv(model_store.ENV_VAR, str(root))
    return root


def _entry(root: Path, kind: str, name: str, marker: bool = True) -> Path:
    folder = root / kind / name
    folder.mkdir(parents=True)
    if marker:
        (folder / model_store.MARKERS[kind]).write_text("{}")
    return folder


def test_store_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(model_store.ENV_VAR, str(tmp_path / "mine"))
    assert model_store.store_root() == tmp_path / "mine"
    monkeypatch.delenv(model_store.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_store.store_root() == tmp_path / "xdg" / "rep_medsam_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_store.store_root() == tmp_path / "home" / ".cache" / "rep_medsam_jax"


def test_resolve_prefers_paths_and_finds_complete_store_entries(store, tmp_path, monkeypatch):
    entry = _entry(store, "exports", "ct")
    _entry(store, "exports", "half", marker=False)           # an interrupted copy
    assert model_store.installed("exports") == ["ct"]
    assert model_store.installed("models") == []
    monkeypatch.chdir(tmp_path)
    assert model_store.resolve("ct", "exports") == entry
    (tmp_path / "ct").mkdir()                                # a folder of that name here wins
    assert model_store.resolve("ct", "exports") == Path("ct")
    assert model_store.resolve("./gone", "exports") == Path("./gone")   # a path, as given
    with pytest.raises(FileNotFoundError, match=r"no entry 'half'.*installed: ct"):
        model_store.resolve("half", "exports")
    with pytest.raises(FileNotFoundError, match=r"installed: none"):
        model_store.resolve("mr", "models")


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", ""])
def test_store_names_cannot_leave_the_store(store, name):
    with pytest.raises(ValueError, match="not a store name"):
        model_store.store_path("models", name)


def test_cli_export_to_the_store_then_predict_by_name(store, tiny_model_dir, tiny_export_dir,
                                                       tmp_path, capsys, monkeypatch):
    from input_pipeline.phantoms import write_phantom_dataset
    from rep_medsam_jax.cli import main
    from rep_medsam_jax.export import onnx_export

    # The export itself is tested in test_export.py; here only where its input and output go.
    calls = []

    def export_model_dir(model_dir, out_dir, **kwargs):
        calls.append((Path(model_dir), Path(out_dir)))
        shutil.copytree(tiny_export_dir, out_dir)
        return {"checksums": {}}

    monkeypatch.setattr(onnx_export, "export_model_dir", export_model_dir)
    shutil.copytree(tiny_model_dir, store / "models" / "tiny")
    assert main(["export", "tiny", "--name", "tiny-onnx"]) == 0
    assert calls == [(store / "models" / "tiny", store / "exports" / "tiny-onnx")]
    capsys.readouterr()
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert str(store) in listing and "tiny-onnx" in listing and "tiny " in listing

    data = write_phantom_dataset(tmp_path / "data", n2d=1, n3d=0, seed=2, size_2d=64)
    assert main(["predict", "-i", str(data.inputs_dir), "-o", str(tmp_path / "pred"),
                 "--model", "tiny-onnx", "-q"]) == 0
    assert len(list((tmp_path / "pred").iterdir())) == 1
    assert main(["predict", "-i", str(data.inputs_dir), "-o", str(tmp_path / "pred"),
                 "--model", "tiny", "-q"]) == 2             # a model dir, not an export
    assert "no entry 'tiny'" in capsys.readouterr().err
    with pytest.raises(SystemExit):                          # -o and --name exclude each other
        main(["export", "tiny", "--name", "a", "-o", str(tmp_path / "b")])
