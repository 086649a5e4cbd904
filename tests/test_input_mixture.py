"""Several datasets mixed with per-source fractions and modality filters
(``input_pipeline.mixture``), through the loader and the training config.

Two small built phantom datasets: "challenge" (CT, MR, US, endoscopy 2D cases and CT / MR 3D
volumes) and "extra" (CT only). Expected counts come from the record indexes read here with
NumPy (``records-<split>.npz``) and the rules written out by hand: fraction f of n slices is
floor(f) copies of each plus round-half-up(frac(f) * n) distinct slices once more.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from input_pipeline.augment import FINETUNE_AUGMENT
from input_pipeline.loader import (MixtureSource, make_loader, restore_iterator,
                                   save_iterator_state)
from input_pipeline.mixture import Mixture, MixtureError, Source, mixture_table
from input_pipeline.phantoms import write_phantom_dataset
from input_pipeline.tfds_builder import BuildOptions, build_dataset


def _build(root: Path, name: str, n2d: int, n3d: int, modalities_2d, modalities_3d) -> Path:
    cases = write_phantom_dataset(root / name / "cases", n2d=n2d, n3d=n3d, seed=1, size_2d=48,
                                  shape_3d=(6, 40, 40), modalities_2d=modalities_2d,
                                  modalities_3d=modalities_3d)
    result = build_dataset(cases.inputs_dir.parent, root / name / "tfds",
                           BuildOptions(image_size=32, validation_fraction=0.25),
                           log=lambda message: None)
    return Path(result.dataset_dir)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixture")
    return {"challenge": _build(root, "challenge", 12, 4, ("CT", "MR", "US", "Endoscopy"),
                                ("CT", "MR")),
            "extra": _build(root, "extra", 4, 1, ("CT",), ("CT",))}


def _index(dataset_dir: Path, split: str = "train") -> dict[str, np.ndarray]:
    with np.load(dataset_dir / f"records-{split}.npz") as archive:
        return {key: archive[key] for key in archive.files}


def _record_modality(dataset_dir: Path, split: str = "train") -> np.ndarray:
    index = _index(dataset_dir, split)
    return index["case_modality"][index["case"]]


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _paper_like(datasets, seed: int = 0) -> Mixture:
    """Challenge without CT, half of the challenge's CT, the extra CT twice."""
    challenge, extra = str(datasets["challenge"]), str(datasets["extra"])
    return Mixture((Source(challenge, exclude_modalities=("CT",)),
                    Source(challenge, modalities=("CT",), fraction=0.5),
                    Source(extra, fraction=2.0)), seed=seed)


def _rows(table, number: int) -> collections.Counter:
    return collections.Counter(table.record[table.source == number].tolist())


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

def test_table_holds_the_expected_slices_per_source_and_modality(datasets):
    modality = _record_modality(datasets["challenge"])
    ct = set(np.flatnonzero(modality == "CT").tolist())
    not_ct = set(np.flatnonzero(modality != "CT").tolist())
    extra = len(_record_modality(datasets["extra"]))
    assert len(ct) >= 5 and len(not_ct) >= 5 and {"MR", "US"} <= set(modality.tolist())
    table = mixture_table(_paper_like(datasets))

    assert _rows(table, 0) == {r: 1 for r in not_ct}                # every non-CT slice once
    half = _rows(table, 1)
    assert len(half) == _round_half_up(0.5 * len(ct))               # distinct slices
    assert set(half) <= ct and set(half.values()) == {1}            # CT only, each once
    assert _rows(table, 2) == {r: 2 for r in range(extra)}          # every slice twice
    assert table.rows_per_source().tolist() == [len(not_ct), _round_half_up(0.5 * len(ct)),
                                                2 * extra]
    assert not table.label.any()                                    # drawn later


def test_object_sampling_lists_every_object_of_each_selected_slice(datasets):
    mixture = _paper_like(datasets)
    slices = mixture_table(mixture, "slice")
    objects = mixture_table(mixture, "object")
    for number, source in enumerate(mixture.sources):
        index = _index(Path(source.dataset_dir))
        selected = _rows(slices, number)
        expected = collections.Counter()
        for record, label in zip(index["object_record"].tolist(),
                                 index["object_label"].tolist()):
            expected[(record, label)] += selected.get(record, 0)
        rows = objects.source == number
        found = collections.Counter(zip(objects.record[rows].tolist(),
                                        objects.label[rows].tolist()))
        assert found == +expected and len(found) > len(selected)


def test_fractions_above_one_repeat_every_slice_and_a_seeded_subset(datasets):
    dataset = str(datasets["extra"])
    n = len(_record_modality(datasets["extra"]))
    counts = _rows(mixture_table(Mixture((Source(dataset, fraction=1.5),))), 0)
    assert set(counts) == set(range(n))
    assert sorted(counts.values()) == [1] * (n - _round_half_up(0.5 * n)) + [2] * _round_half_up(
        0.5 * n)
    assert _rows(mixture_table(Mixture((Source(dataset),))), 0) == {r: 1 for r in range(n)}


def test_the_subset_is_seeded(datasets):
    def subset(seed):
        return set(_rows(mixture_table(_paper_like(datasets, seed)), 1))

    first = subset(0)
    assert subset(0) == first
    others = [subset(seed) for seed in (1, 2, 3)]
    assert all(len(s) == len(first) for s in others)
    assert any(s != first for s in others)       # 3 draws of C(n, n/2) subsets: all equal ~ 0


def test_bad_mixtures_are_refused_with_clear_errors(datasets):
    challenge = str(datasets["challenge"])
    with pytest.raises(MixtureError, match=r"no modality \['PET'\].*'CT', 'Endoscopy', 'MR'"):
        mixture_table(Mixture((Source(challenge, modalities=("CT", "PET")),)))
    with pytest.raises(MixtureError, match="no modality"):
        mixture_table(Mixture((Source(challenge, exclude_modalities="ct"),)))
    with pytest.raises(MixtureError, match="at least one source"):
        Mixture(())
    for fraction in (0, -0.5, float("nan"), float("inf")):
        with pytest.raises(MixtureError, match="fraction must be a finite number > 0"):
            Source(challenge, fraction=fraction)
    with pytest.raises(MixtureError, match="not both"):
        Source(challenge, modalities=("CT",), exclude_modalities=("MR",))
    with pytest.raises(MixtureError, match="selects no slice"):
        mixture_table(Mixture((Source(challenge, fraction=0.001),)))
    with pytest.raises(MixtureError, match="selects no slice"):
        mixture_table(Mixture((Source(challenge, exclude_modalities=(
            "CT", "MR", "US", "Endoscopy")),)))
    with pytest.raises(MixtureError, match="records-test.npz does not exist"):
        mixture_table(Mixture((Source(challenge, split="test"),)))
    with pytest.raises(MixtureError, match=r"sources \[1\] have none"):
        Mixture((Source(challenge, teacher_cache_dir="cache"), Source(challenge)))


# --------------------------------------------------------------------------------------------
# The loader over a mixture
# --------------------------------------------------------------------------------------------

def _stream(loader) -> list[tuple[int, int, int]]:
    return [(int(s), int(i), int(k))
            for b in loader for s, i, k in zip(b["source"], b["index"], b["label"])]


def test_one_epoch_shows_each_selected_slice_its_number_of_times(datasets):
    mixture = _paper_like(datasets)
    modality = _record_modality(datasets["challenge"])
    extra = len(_record_modality(datasets["extra"]))
    loader = make_loader(mixture, batch_size=2, seed=3, num_epochs=1, drop_remainder=False)
    stream = _stream(loader)
    seen = collections.Counter((s, i) for s, i, _ in stream)
    chosen_ct = {i for s, i in seen if s == 1}
    expected = collections.Counter({(0, r): 1 for r in np.flatnonzero(modality != "CT")})
    expected.update({(1, r): 1 for r in chosen_ct})
    expected.update({(2, r): 2 for r in range(extra)})
    assert seen == expected
    assert len(chosen_ct) == _round_half_up(0.5 * np.sum(modality == "CT"))
    assert all(modality[r] == "CT" for r in chosen_ct)
    # The object drawn each time belongs to that slice of that source.
    objects = [collections.defaultdict(set) for _ in mixture.sources]
    for number, source in enumerate(mixture.sources):
        index = _index(Path(source.dataset_dir))
        for record, label in zip(index["object_record"], index["object_label"]):
            objects[number][int(record)].add(int(label))
    assert all(k in objects[s][i] for s, i, k in stream)
    # The same mixture walked by objects: every object of every selected slice, as often.
    by_object = _stream(make_loader(mixture, batch_size=2, seed=3, num_epochs=1,
                                    drop_remainder=False, sampling="object"))
    table = mixture_table(mixture, "object")
    assert collections.Counter(by_object) == collections.Counter(
        zip(table.source.tolist(), table.record.tolist(), table.label.tolist()))
    assert {(s, i) for s, i, _ in by_object} == set(seen)


def test_a_one_source_mixture_reads_what_the_dataset_reads(datasets):
    """Fraction 1 without filters is the dataset itself: the same batches, plus ``source``."""
    dataset = datasets["challenge"]
    single = make_loader(dataset, "train", batch_size=3, seed=5, augment=FINETUNE_AUGMENT)
    mixed = make_loader(Mixture((Source(dataset),), seed=9), batch_size=3, seed=5,
                        augment=FINETUNE_AUGMENT)
    for a, b in zip(_take(iter(single), 3), _take(iter(mixed), 3)):
        assert not b["source"].any()
        b = {k: v for k, v in b.items() if k != "source"}
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _same_batches(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[Mixture, Mixture]:
    """Two one-source mixtures of as many rows whose datasets share name, config and version
    (med_sam_slices/size32/2.0.0) but hold other cases: 2D CT and 2D MR phantoms."""
    root = tmp_path_factory.mktemp("twins")
    mixtures = tuple(Mixture((Source(str(_build(root, m, 4, 0, (m,), ())),),))
                     for m in ("CT", "MR"))
    assert len(mixture_table(mixtures[0])) == len(mixture_table(mixtures[1])) > 0
    return mixtures


def test_iteration_over_a_mixture_resumes_exactly_also_when_moved(datasets, twins, tmp_path):
    def make(mixture):
        return make_loader(mixture, batch_size=3, seed=11, augment=FINETUNE_AUGMENT)

    mixture = _paper_like(datasets)
    iterator = iter(make(mixture))
    _take(iterator, 4)
    save_iterator_state(iterator, tmp_path / "state")
    expected = _take(iterator, 3)
    assert _same_batches(_take(restore_iterator(make(mixture), tmp_path / "state"), 3),
                         expected)
    # The extra dataset copied to another folder: the state names data, not paths.
    moved = tmp_path / "elsewhere" / Path(datasets["extra"]).relative_to(
        Path(datasets["extra"]).parents[2])
    shutil.copytree(datasets["extra"], moved)
    relocated = dataclasses.replace(mixture, sources=mixture.sources[:2] + (
        dataclasses.replace(mixture.sources[2], dataset_dir=str(moved)),))
    assert _same_batches(_take(restore_iterator(make(relocated), tmp_path / "state"), 3),
                         expected)
    # A mixture of as many rows but other data is refused: another subset seed, or another
    # dataset under the same name/config/version (told apart by its record index's digest).
    with pytest.raises(ValueError, match="data source"):
        restore_iterator(make(dataclasses.replace(mixture, seed=1)), tmp_path / "state")
    iterator = iter(make(twins[0]))
    _take(iterator, 1)
    save_iterator_state(iterator, tmp_path / "twin_state")
    with pytest.raises(ValueError, match="data source"):
        restore_iterator(make(twins[1]), tmp_path / "twin_state")


def test_hosts_read_disjoint_equal_shares_of_a_mixture(datasets):
    mixture = _paper_like(datasets)
    total = len(MixtureSource(mixture))
    shares = []
    for host in range(2):
        loader = make_loader(mixture, batch_size=2, seed=0, num_epochs=1, process_index=host,
                             process_count=2)
        shares.append(collections.Counter((s, i) for s, i, _ in _stream(loader)))
    assert sum(shares[0].values()) == sum(shares[1].values()) == (total // 4) * 2
    both = shares[0] + shares[1]
    single = collections.Counter((s, i) for s, i, _ in _stream(
        make_loader(mixture, batch_size=4, seed=0, num_epochs=1)))
    assert both == single                       # two hosts read what one host reads


@pytest.mark.slow
def test_iteration_over_a_mixture_with_worker_processes_resumes_exactly(datasets):
    mixture = _paper_like(datasets)

    def make():
        return make_loader(mixture, batch_size=2, seed=3, augment=FINETUNE_AUGMENT,
                           worker_count=2)

    iterator = iter(make())
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 2)
    resumed = iter(make())
    resumed.set_state(state)
    assert _same_batches(_take(resumed, 2), expected)


@pytest.fixture(scope="module")
def caches(datasets, tmp_path_factory) -> dict[str, Path]:
    """A teacher cache of each dataset's train split whose embeddings are constant per slice:
    1 + (the stored slice's mean / 255) for the challenge set, 2 + (that) for the extra set (a
    stand-in encode function; the ViT itself is tested in tests/test_input_teacher_cache.py)."""
    from input_pipeline.teacher_cache import Teacher, build_teacher_cache
    from rep_medsam_jax.models.config import VIT_VARIANTS

    teacher = Teacher(VIT_VARIANTS["vit_tiny"], {}, "stand-in")
    root = tmp_path_factory.mktemp("caches")
    result = {}
    for offset, name in enumerate(("challenge", "extra"), start=1):
        def encode(batch, offset=offset):
            images = batch["images"]                   # the stored uint8 slices (device path)
            values = offset + images.mean(axis=(1, 2, 3)) / 255.0
            return np.broadcast_to(values[:, None, None, None],
                                   images.shape[:1] + teacher.embedding_shape).astype(np.float16)

        build_teacher_cache(datasets[name], "train", root / name, teacher, batch_size=4,
                            encode_fn=encode, log=lambda message: None)
        result[name] = root / name
    return result


def test_each_source_reads_its_own_teacher_cache(datasets, caches):
    from input_pipeline.teacher_cache import TeacherCache

    mixture = Mixture((Source(str(datasets["challenge"]), exclude_modalities=("CT",),
                              teacher_cache_dir=str(caches["challenge"])),
                       Source(str(datasets["extra"]), fraction=2.0,
                              teacher_cache_dir=str(caches["extra"]))))
    stored = [TeacherCache(caches["challenge"]), TeacherCache(caches["extra"])]
    rows = 0
    for batch in make_loader(mixture, batch_size=2, num_epochs=1, drop_remainder=False):
        for source, index, embedding in zip(batch["source"], batch["index"],
                                            batch["teacher_embedding"]):
            assert np.array_equal(embedding, stored[source][int(index)])
            assert 1 + source <= float(embedding[0, 0, 0]) <= 2 + source
            rows += 1
    assert rows == len(mixture_table(mixture))


# --------------------------------------------------------------------------------------------
# The training config: data.sources
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _config(datasets, **data):
    from rep_medsam_jax.training.config import (DataSection, DataSource, ModelSection,
                                                TrainConfig)
    from rep_medsam_jax.training.optim import OptimConfig

    challenge, extra = str(datasets["challenge"]), str(datasets["extra"])
    sources = (DataSource(challenge, exclude_modalities=("CT",)),
               DataSource(challenge, modalities=("CT",), fraction=0.5),
               DataSource(extra, fraction=2.0))
    return TrainConfig(
        name="mixture", stage="seg", model=ModelSection(preset="rep_medsam_tiny", image_size=32),
        data=DataSection(**{"sources": sources, "augment": "finetune", "box_shift": 2, **data}),
        optim=OptimConfig(learning_rate=1e-3, clip="none"), batch_size=4, total_steps=2,
        eval_every_steps=2, eval_max_batches=1, log_every_steps=1, progress_bar=False,
        export_model=False, async_checkpoints=False)


def test_sources_round_trip_through_config_dicts_json_and_overrides(datasets):
    import json

    from rep_medsam_jax.training.config import (DataSource, TrainConfig, apply_overrides,
                                                as_config_dict, from_config_dict)

    config = _config(datasets)
    assert from_config_dict(as_config_dict(config)) == config
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    text = json.dumps([{"dataset_dir": "D", "modalities": ["CT"], "fraction": 0.2}])
    changed = apply_overrides(config, [f"data.sources={text}"])
    assert changed.data.sources == (DataSource("D", modalities=("CT",), fraction=0.2),)


def test_train_cli_takes_sources_on_the_command_line(datasets, tmp_path):
    import json
    import subprocess
    import sys

    challenge = str(datasets["challenge"])
    sources = (f"({{'dataset_dir': {challenge!r}, 'exclude_modalities': ('CT',)}}, "
               f"{{'dataset_dir': {challenge!r}, 'modalities': ('CT',), 'fraction': 0.2}})")
    run = subprocess.run([sys.executable, "train.py", "--config", "configs/finetune.py",
                          "--workdir", str(tmp_path / "w"), "--print_config",
                          f"--config.data.sources={sources}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = json.loads(run.stdout)["data"]["sources"]
    assert [(s["dataset_dir"], s["modalities"], s["exclude_modalities"], s["fraction"])
            for s in printed] == [(challenge, [], ["CT"], 1.0), (challenge, ["CT"], [], 0.2)]


def test_config_checks_each_source(datasets, tmp_path):
    from rep_medsam_jax.training.config import ConfigError, DataSource, validate

    validate(_config(datasets))
    challenge = str(datasets["challenge"])
    cases = [
        (dict(sources=(DataSource(challenge, modalities=("PET",)),)),
         r"data.sources: source 0 .* no modality \['PET'\]"),
        (dict(sources=(DataSource(challenge), DataSource(str(tmp_path / "nowhere"))),),
         r"data.sources\[1\].dataset_dir .*nowhere does not exist"),
        (dict(sources=(DataSource(challenge, fraction=0.0),)), "fraction must be"),
        (dict(dataset_dir=challenge), "not both"),
        (dict(eval_dataset_dir=str(tmp_path)), "data.eval_dataset_dir .* not a built dataset"),
    ]
    for data, message in cases:
        config = _config(datasets, **data)
        with pytest.raises(ConfigError, match=message):
            validate(config)
    distill = dataclasses.replace(_config(datasets, augment="distill"), stage="distill")
    distill = dataclasses.replace(distill, optim=dataclasses.replace(
        distill.optim, trainable=("image_encoder",)))
    with pytest.raises(ConfigError, match=r"needs data.sources\[0\].teacher_cache_dir"):
        validate(distill)


def test_distillation_from_caches_reads_each_sources_cache(datasets, caches, tmp_path):
    from rep_medsam_jax.training.config import TeacherSection, validate
    from rep_medsam_jax.training.loop import make_loaders, prepare_dataset

    config = _config(datasets, augment="distill")
    sources = (dataclasses.replace(config.data.sources[0],
                                   teacher_cache_dir=str(caches["challenge"])),
               dataclasses.replace(config.data.sources[2], teacher_cache_dir=str(caches["extra"])))
    config = dataclasses.replace(
        config, stage="distill", teacher=TeacherSection(source="cache"),
        data=dataclasses.replace(config.data, sources=sources),
        optim=dataclasses.replace(config.optim, trainable=("image_encoder",)))
    validate(config)
    train, *_ = make_loaders(config, prepare_dataset(config, tmp_path), 4)
    batch = next(iter(train))
    assert batch["teacher_embedding"].shape == (4, 8, 8, 256)
    # Each row's target is its own source's: 1 + mean (challenge) or 2 + mean (extra).
    low = batch["teacher_embedding"].min(axis=(1, 2, 3)).astype(float)
    assert np.all((1 + batch["source"] <= low) & (low <= 2 + batch["source"]))


def test_make_loaders_reads_the_mixture_and_evaluates_on_the_first_source(datasets, tmp_path):
    from rep_medsam_jax.training.loop import make_loaders, prepare_dataset

    config = _config(datasets)
    modality = _record_modality(datasets["challenge"])
    expected_rows = (np.sum(modality != "CT") + _round_half_up(0.5 * np.sum(modality == "CT"))
                     + 2 * len(_record_modality(datasets["extra"])))
    lines = []
    dataset_dir = prepare_dataset(config, tmp_path)
    train, eval_iterator, train_size, eval_size = make_loaders(config, dataset_dir, 4,
                                                               log=lines.append)
    assert train_size == expected_rows
    assert eval_size == len(_index(datasets["challenge"], "validation")["object_record"])
    half_ct = _round_half_up(0.5 * np.sum(modality == "CT"))
    assert len(lines) == 3 and lines[1].endswith(f": {half_ct} rows (CT {half_ct})")
    batch = next(iter(train))
    assert batch["image"].shape == (4, 32, 32, 3) and set(batch["source"]) <= {0, 1, 2}
    assert sum(b["mask"].shape[0] for b in eval_iterator()) == eval_size
    # An explicit evaluation dataset.
    other = _config(datasets, eval_dataset_dir=str(datasets["extra"]))
    *_, other_eval_size = make_loaders(other, prepare_dataset(other, tmp_path), 4)
    assert other_eval_size == len(_index(datasets["extra"], "validation")["object_record"])
