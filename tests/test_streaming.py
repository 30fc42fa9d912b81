"""Streamed image folders: the same images, labels and teacher maps as the in-memory path, read
one batch at a time (scikit-learn digits written to a temporary ImageFolder)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SMOKE, TINY_OVERRIDES, digits_image_folder
from xkd_ray.config.schema import DataConfig, ExperimentConfig
from xkd_ray.core.explain import cached_teacher_outputs, explain_settings
from xkd_ray.core.models import build_teacher
from xkd_ray.core.streamed import stream_epoch_loader, stream_teacher_outputs
from xkd_ray.data.datasets import load_splits
from xkd_ray.data.streaming import resolve_storage, storage_for, stream_imagefolder
from xkd_ray.errors import XKDDataError


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return digits_image_folder(tmp_path_factory.mktemp("digits_tree"))


def test_streamed_splits_equal_the_in_memory_splits(tree: Path, tmp_path: Path) -> None:
    config = DataConfig(dataset="imagefolder", root=str(tree), image_size=16, val_fraction=0.2)
    memory = load_splits(config)
    stream = stream_imagefolder(config, tmp_path)
    for name in ("train", "val", "test"):
        assert torch.equal(stream.split(name).labels, memory.split(name).labels)
        ids = np.arange(len(stream.split(name)))[::-1].copy()  # any order: rows come back as asked
        # Same uint8 decode; only the mean/std are summed differently (float64 moments): 1e-4.
        assert torch.allclose(stream.split(name).read(ids), memory.split(name).images[ids], atol=1e-4)
    assert (stream.num_classes, stream.in_channels) == (memory.num_classes, memory.in_channels)
    assert len(pickle.dumps(stream)) < 20_000  # paths and labels, no pixels
    again = stream_imagefolder(config, tmp_path)  # the shards are reused, not rewritten
    assert again.train.path == stream.train.path


def test_streamed_teacher_maps_equal_the_parquet_cache(tree: Path, tmp_path: Path) -> None:
    config = DataConfig(dataset="imagefolder", root=str(tree), image_size=16, val_fraction=0.2)
    stream = stream_imagefolder(config, tmp_path)
    torch.manual_seed(0)
    teacher = build_teacher("vgg", 3, 10, 8).eval()
    settings = explain_settings("gradcam", None, 32, 1.0)
    split = stream.train
    streamed, hit = stream_teacher_outputs(
        teacher, "t", split, "train", "fp", settings, batch_size=32, cache_dir=tmp_path
    )
    images = split.read(np.arange(len(split)))
    memory, _, _ = cached_teacher_outputs(
        teacher, "t", images, "train", "fp", explainer="gradcam", layer=None, ig_steps=32, blur_sigma=1.0,
        batch_size=32, cache_dir=tmp_path, progress=False,
    )  # fmt: skip
    ids = np.array([5, 0, len(split) - 1, 17])
    logits, maps = streamed.read(ids)
    assert not hit
    assert torch.allclose(maps, memory.maps[ids], atol=1e-5)
    assert torch.allclose(logits, memory.logits[ids], atol=1e-5)
    assert torch.allclose(streamed.template_map, memory.maps.mean(0), atol=1e-5)
    assert stream_teacher_outputs(teacher, "t", split, "train", "fp", settings, batch_size=32, cache_dir=tmp_path)[1]
    # An epoch's batches cover every train image once, each with its own map.
    seen = []
    for batch_images, labels, _, batch_maps in stream_epoch_loader(
        split, streamed, batch_size=64, seed=0, epoch=0, augment=False
    ):
        assert batch_images.shape[1:] == (3, 16, 16) and len(batch_maps) == len(labels)
        seen.append(len(labels))
    assert sum(seen) == len(split)


def test_storage_choice_and_refusals(tree: Path, tmp_path: Path) -> None:
    small = DataConfig(dataset="imagefolder", root=str(tree), image_size=16)
    assert resolve_storage(small, 300, 3) == "memory"
    assert resolve_storage(small.model_copy(update={"stream_threshold_mb": 1}), 300_000, 3) == "stream"
    assert ExperimentConfig().data.storage == "auto"  # digits keep the in-memory path
    with pytest.raises(ValueError, match=r"data\.storage: stream reads image folders only"):
        DataConfig(dataset="digits", storage="stream")
    broken = digits_image_folder(tmp_path / "broken", 300)
    next((broken / "train").rglob("*.png")).write_bytes(b"not a png")
    cache = tmp_path / "cache"
    with pytest.raises(XKDDataError, match="cannot read image"):
        stream_imagefolder(DataConfig(dataset="imagefolder", root=str(broken), image_size=16), cache)
    assert list((cache / "streams").iterdir()) == []  # nothing half-written left behind


def test_auto_storage_streams_an_image_folder_above_the_threshold(tree: Path) -> None:
    """``auto`` counts the files (no decoding): 300 RGB images at 32 px are 3.5 MB as float32."""
    at_32 = DataConfig(dataset="imagefolder", root=str(tree), image_size=32)
    assert storage_for(at_32) == "memory"
    assert storage_for(at_32.model_copy(update={"stream_threshold_mb": 1})) == "stream"
    assert storage_for(DataConfig()) == "memory"  # digits never stream


def test_xkd_distill_streams_and_its_student_predicts_the_raw_files(tree: Path, tmp_path: Path, capsys) -> None:
    """``xkd distill`` with ``data.storage=stream`` trains from the shards (not the in-memory path),
    and the saved student, given the raw test files, reproduces its recorded test accuracy:
    the folder's preprocessing is the shard's decoding."""
    from xkd_ray.student.predict import load_student_folder
    from xkd_ray.ui.cli import main

    out, cache = tmp_path / "student", tmp_path / "cache"
    sets = {**TINY_OVERRIDES, "data.dataset": "imagefolder", "data.root": str(tree), "data.storage": "stream",
            "data.val_fraction": 0.2, "explain.cache_dir": str(cache)}  # fmt: skip
    argv = ["distill", "--method", "kd", "--out", str(out)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0, capsys.readouterr().err
    assert list((cache / "streams").iterdir())  # the shards were built
    student = load_student_folder(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["data"]["storage"] == "stream"
    files = sorted((tree / "test").rglob("*.png"))
    labels = torch.tensor([student.prep.class_names.index(path.parent.name) for path in files])
    predicted = student.predict([str(path) for path in files], explain=False).labels
    assert (predicted == labels).float().mean().item() == pytest.approx(metrics["test"]["accuracy"], abs=1e-9)
    # The teacher this run trained, given back as teacher.checkpoint with an empty cache: loaded,
    # never retrained, the same test accuracy.
    (teacher,) = (cache / "teachers").iterdir()
    again = dict(sets, **{"explain.cache_dir": str(tmp_path / "cache2"), "teacher.checkpoint": str(teacher)})
    argv_again = ["distill", "--method", "kd", "--out", str(tmp_path / "again")]
    for key, value in again.items():
        argv_again += ["--set", f"{key}={value}"]
    assert main(argv_again) == 0, capsys.readouterr().err
    assert not (tmp_path / "cache2" / "teachers").exists()
    reloaded = json.loads((tmp_path / "again" / "metrics.json").read_text())["teacher"]["test_accuracy"]
    assert reloaded == pytest.approx(metrics["teacher"]["test_accuracy"], abs=1e-9)
    # Streamed batches carry the teacher's cached outputs, not the network: AT is refused up front.
    shards = sorted(path.name for path in (cache / "streams").iterdir())
    refused = main(["distill", "--method", "at", "--out", str(tmp_path / "other"), *argv[5:]])
    assert refused == 2 and "distill.method: 'at' needs the live teacher" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert sorted(path.name for path in (cache / "streams").iterdir()) == shards


def test_a_streamed_search_that_cannot_hold_is_refused_before_anything_is_written(tree: Path, tmp_path: Path, capsys):
    """Trials read the shards from the nodes' disk and the teacher's cached outputs only: a space
    that may train a method on the live teacher, or an experiment on object storage, is refused
    with one line, before a folder, a shard or a connection is made."""
    import yaml

    from xkd_ray.search import main

    raw = yaml.safe_load(SMOKE.read_text())
    raw["base"]["data"] = {"dataset": "imagefolder", "root": str(tree), "image_size": 16, "storage": "stream"}
    raw["base"]["explain"]["cache_dir"] = str(tmp_path / "cache")
    raw["space"]["distill.method"] = {"choice": ["kd", "at"]}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    out = tmp_path / "experiment"
    assert main(["--space", str(space), "--out", str(out), "--no-live"]) == 2
    assert "distill.method: at train on the live teacher" in capsys.readouterr().err
    raw["space"]["distill.method"] = {"choice": ["kd", "xd"]}
    space.write_text(yaml.safe_dump(raw))
    assert main(["--space", str(space), "--out", "s3://bucket/prefix", "--no-live"]) == 2
    assert "--out: streamed shards are read from explain.cache_dir" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_ray_train_reads_streamed_shards_and_agrees_with_the_one_process_loop(tree: Path, tmp_path: Path, ray_local):
    """Ray Train on streamed data (``xkd distill --workers 2``): each rank reads its share of every
    epoch's batches from the shards, gradients are averaged, and the run ends where the streamed
    loop in one process ends: within two images of accuracy per split and the fidelity tolerance of
    the in-memory check (tests/test_train.py: float summation order in the all-reduce). Augmentation
    off: its draws are per batch, and a rank's batch is half the one-process batch."""
    from tests.test_train import FIDELITY_TOLERANCE
    from xkd_ray.cluster.ray_run import distill_with_ray
    from xkd_ray.core.stream_run import distill_stream, prepare_stream

    sets = {**TINY_OVERRIDES, "data.dataset": "imagefolder", "data.root": str(tree), "data.storage": "stream",
            "data.val_fraction": 0.2, "explain.cache_dir": str(tmp_path / "cache"), "distill.method": "xd",
            "data.augment": False}  # fmt: skip
    config = ExperimentConfig().with_overrides(sets)
    data = prepare_stream(config, progress=False)
    plain = distill_stream(config, data, progress=False)[1]
    two = distill_with_ray(config.with_overrides({"ray.num_workers": 2}), data, storage_path=tmp_path / "run")[1]
    assert [h["workers"] for h in two["history"]] == [2] * config.distill.epochs
    for split in ("val", "test"):
        two_images = 2 / len(data.splits.split(split))
        assert abs(two[split]["accuracy"] - plain[split]["accuracy"]) <= two_images + 1e-9
        assert abs(two[split]["fidelity"] - plain[split]["fidelity"]) <= FIDELITY_TOLERANCE
