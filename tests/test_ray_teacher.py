"""The teacher on Ray workers (xkd_ray/cluster/ray_teacher.py), on the session's real local Ray.

Every test uses its own cache folder: a teacher trained here must never become the teacher the
session's shared ``tiny_data`` reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import xkd_ray.core.explain as explain_module
import xkd_ray.core.teacher as teacher_module
from tests.conftest import TINY_OVERRIDES, injected_faults
from xkd_ray.cluster.fault_hooks import FAULT_MARKER
from xkd_ray.cluster.ray_explain import prepare_on_workers
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.prepared import prepare
from xkd_ray.core.teacher import load_or_train_teacher, teacher_directory
from xkd_ray.data.datasets import load_splits
from xkd_ray.data.splits import SPLIT_NAMES
from xkd_ray.ui.cli import main

# Small enough for seconds per epoch on 2 cores; the same code paths as the default.
TINY = {
    "data.image_size": 16,
    "data.max_train_samples": 240,
    "teacher.width": 8,
    "teacher.epochs": 2,
    "ray.cpus_per_worker": 1.0,
    # The teacher's faithfulness measured as in the rest of the suite (conftest's TINY_OVERRIDES): at
    # the defaults, 95% of explaining these splits was the teacher's ROAD curves (3.5 of 4.0 s).
    **{key: value for key, value in TINY_OVERRIDES.items() if key.startswith("faithfulness.")},
}


def tiny(cache: Path, **overrides: object) -> ExperimentConfig:
    return ExperimentConfig().with_overrides({**TINY, "explain.cache_dir": str(cache), **overrides})


def training_record(config: ExperimentConfig) -> dict:
    directory = teacher_directory(config, load_splits(config.data))
    return json.loads((directory / "config.json").read_text())["training"]


def refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"{what} ran, but everything should have come from the cache")

    return refused


def test_pipeline_on_workers_survives_a_killed_worker_and_fills_the_caches_plain_prepare_reads(
    ray_local, tmp_path, monkeypatch, capsys
):
    """Ray Train (2 workers, DDP) trains the teacher and Ray actors explain every split. The last
    worker SIGKILLs itself at the start of epoch 1 (after epoch 0's checkpoint): Ray Train restarts
    the worker group, which resumes at epoch 1, and the teacher is saved. A plain ``prepare`` then
    trains and explains nothing, and gets the same bundle."""
    config = tiny(tmp_path / "cache", **{"teacher.epochs": 3, "teacher.seed": 11})
    rule = {"fault": "kill_worker", "epoch": 1, "when": {"stage.name": "teacher", "teacher.seed": 11}}
    with injected_faults([rule]):
        data = prepare_on_workers(config, workers=2, use_gpu=False, progress=True)
    assert data.cache_hits == dict.fromkeys(SPLIT_NAMES, False)
    printed = capsys.readouterr().out  # not a terminal: plain progress lines
    assert "teacher epochs (Ray Train): 3/3 (100%)" in printed
    assert "teacher gradcam on 2 Ray workers (train, val, test):" in printed

    node = ray_local.get_runtime_context().get_node_id()
    training = training_record(config)
    assert (Path(training["run"]) / FAULT_MARKER).exists(), "the fault never fired"
    assert training["backend"] == "ray_train" and training["workers"] == 2
    assert training["node_ids"] == [node] and training["worker_node_ids"] == [node, node]
    assert training["resumed_from_checkpoint"]
    history = training["history"]
    assert [record["epoch"] for record in history] == [0, 1, 2]  # each epoch once: none lost, none redone
    assert [record["start_epoch"] for record in history] == [0, 1, 1]
    for name, path in data.cache_files.items():
        info = json.loads(pq.read_schema(path).metadata[b"xkd_ray"])
        assert info["split"] == name and info["computed_on"] == {
            "backend": "ray_actors",
            "workers": 2,
            "node_ids": [node],
        }

    monkeypatch.setattr(teacher_module, "train_teacher", refuse("teacher training"))
    monkeypatch.setattr(explain_module, "explain_maps", refuse("explaining"))
    plain = prepare(config, progress=False)
    assert plain.teacher_id == data.teacher_id and plain.cache_hits == dict.fromkeys(SPLIT_NAMES, True)
    assert plain.cache_files == data.cache_files
    assert plain.teacher_metrics == data.teacher_metrics
    for key, value in plain.teacher_state.items():
        assert torch.equal(value, data.teacher_state[key]), key
    again = load_or_train_teacher(config, load_splits(config.data), progress=False)
    assert again.teacher_id == data.teacher_id


@pytest.mark.parametrize(
    "explain",
    [
        {},
        {"explain.explainer": "integrated_gradients", "explain.ig_steps": 4, "explain.batch_size": 64},
        {"teacher.input_size": 24, "teacher.mean": [0.5], "teacher.std": [0.25]},  # the teacher's own input
    ],
)
def test_distributed_explanations_equal_single_process_ones(ray_local, tmp_path, explain):
    """Same teacher (trained by the plain loop), explanations computed once in this process and
    once on 2 Ray workers: the same logits, maps, degenerate counts and teacher AUCs (with a
    declared input contract too: the actors convert each batch and resize the maps back)."""
    config = tiny(tmp_path / "cache", **explain)
    single = prepare(config, progress=False)  # plain teacher + single-process caches
    assert training_record(config) == {"backend": "plain", "workers": 0}
    kept = tmp_path / "single"
    shutil.move(tmp_path / "cache" / "explanations", kept)
    distributed = prepare_on_workers(config, workers=2, use_gpu=False, progress=False)
    assert distributed.cache_hits == dict.fromkeys(SPLIT_NAMES, False)  # the teacher was reused, not retrained
    assert distributed.cache_files == single.cache_files  # same content-hashed names
    for name in SPLIT_NAMES:
        ours, theirs = distributed.teacher_outputs[name], single.teacher_outputs[name]
        assert ours.maps.shape[-2:] == (16, 16)  # the student's size, whatever the teacher's
        torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.maps, theirs.maps, rtol=1e-5, atol=1e-5)
        assert ours.degenerate_maps == theirs.degenerate_maps
        for curve in ("deletion_auc", "insertion_auc"):
            if name == "train":
                assert getattr(ours, curve) is None and getattr(theirs, curve) is None
            else:
                torch.testing.assert_close(getattr(ours, curve), getattr(theirs, curve), rtol=1e-5, atol=1e-5)
        # The files themselves hold the same columns (only the metadata says where they were made).
        ours_table = pq.read_table(distributed.cache_files[name])
        theirs_table = pq.read_table(kept / Path(single.cache_files[name]).name)
        assert ours_table.column_names == theirs_table.column_names
        assert ours_table.column("index").equals(theirs_table.column("index"))


def test_cli_teacher_on_one_ray_worker(ray_local, tmp_path, capsys):
    """``xkd teacher --workers 1`` joins the running Ray (``ensure_ray``), trains under Ray Train's
    single-worker trainer and explains on one actor; bad flags are refused before anything runs."""
    cache = tmp_path / "cache"
    argv = ["teacher", "--set", f"explain.cache_dir={cache}"]
    for key, value in TINY.items():
        argv += ["--set", f"{key}={value}"]
    assert main([*argv, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "teacher epochs (Ray Train): 2/2" in out and "computed" in out
    training = training_record(tiny(cache))
    assert training["backend"] == "ray_train" and training["workers"] == 1 and len(training["node_ids"]) == 1

    assert main([*argv, "--workers", "1"]) == 0  # everything cached now
    out = capsys.readouterr().out
    assert "(cached)" in out and "(computed)" not in out and "Ray Train" not in out

    for bad, message in ((["--workers", "-1"], "--workers: got -1"), (["--gpu"], "--gpu and --address need")):
        assert main([*argv, *bad]) == 2
        assert message in capsys.readouterr().err
