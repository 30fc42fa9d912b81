"""Every table is readable on an 80-column terminal, whatever the registries hold.

A user report: at 80 columns the tables printed ``accura… agreeme… fideli… fidelit… fideli…``
(three fidelity columns nobody could tell apart), and the search's live table showed an empty
``epoch`` column for every trial. Each table is rendered here exactly as ``xkd`` prints it, on
a recording console 80 columns wide, with every registered metric (the test plugin's included).
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from tests.conftest import SMOKE
from tests.registry_plugin import PLUGIN_METRIC
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.metrics import METRICS
from xkd_ray.pareto.display import (
    Fitted,
    epoch_progress,
    front_table,
    items_table,
    legend,
    live_trials_table,
    metrics_table,
    short_names,
)

WIDTH = 80
TRIALS = ("0c9d1f2a", "5e7b3a10", "9f2073da", "ba733d5b")  # Tune's trial ids, as a real search names them


def render(renderable: Any, width: int = WIDTH) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def value(index: int, name: str) -> float | int:
    """A distinct, realistic value per (row, metric); skills go negative on odd rows (marked)."""
    if name == "degenerate_maps":
        return index
    if name == "params":
        return 41_000 + 1_000 * index
    base = (index * 0.137 + list(METRICS).index(name) * 0.031) % 0.9 + 0.05
    if METRICS[name].error_of is not None:
        return base / 100  # a standard error: small
    if name.endswith(("_teacher_rand", "_teacher_shift")):  # the controls on the teacher: clearly worse, so every
        # curve is informative
        return 1.0 if METRICS[name].direction == "min" else 0.0
    return -base / 4 if name.endswith("_skill") and index % 2 else base


def header_cells(text: str) -> list[str]:
    """The column headers of the first table in ``text``, multi-line headers joined by spaces."""
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    bottom = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    rows = [[cell.strip() for cell in line.strip("┃").split("┃")] for line in lines[top + 1 : bottom]]
    return [" ".join(part for part in column if part) for column in zip(*rows, strict=True)]


def legend_entries(text: str) -> dict[str, str]:
    entries = re.findall(r"(\S+)=(\S+)", text)
    shorts = [short for short, _ in entries]
    assert len(shorts) == len(set(shorts)), entries
    return dict(entries)


def assert_readable(text: str) -> None:
    assert "…" not in text, text
    assert all(len(line) <= WIDTH for line in text.splitlines()), text


# ----------------------------------------------------------------------------- short names


def test_short_names_of_the_registry_are_unique_and_derived_from_the_names():
    shorts = short_names(METRICS)
    assert list(shorts) == list(METRICS)
    assert len(set(shorts.values())) == len(shorts)
    for name, short in shorts.items():
        parts, cut = name.split("_"), short.split("_")
        assert len(parts) == len(cut) and all(p.startswith(c) and c for p, c in zip(parts, cut, strict=True))
    # the three fidelity columns of the report are told apart
    assert len({shorts[n] for n in ("fidelity", "fidelity_posthoc", "fidelity_template", "fidelity_skill")}) == 4
    assert shorts["accuracy"] == "acc" and shorts["fidelity_posthoc_skill"] == "fid_pos_ski"


@pytest.mark.parametrize(
    ("names", "reserved"),
    [
        (["acc", "accuracy", "acc_x", "accuracy_x"], ()),
        (["random_head", "randomisation_head", "rand_head"], ()),
        (["fidelity", "fidelity_a", "fidelity_b", "fid", "f"], ()),
        (["status", "stat", "epoch_time", "front"], ("trial", "status", "epoch", "front")),
        ([f"{a}_{b}" for a in ("deletion", "delta", "del") for b in ("auc", "auc_head", "au")], ("del_auc",)),
    ],
)
def test_short_names_stay_unique_when_names_collide(names, reserved):
    shorts = short_names(names, reserved=reserved)
    assert set(shorts) == set(names)
    assert len(set(shorts.values())) == len(names)
    assert not set(shorts.values()) & set(reserved)


def test_legend_maps_every_shortened_name_back():
    shorts = short_names(METRICS)
    assert legend_entries(legend(shorts)) == {s: n for n, s in shorts.items() if s != n}


# ----------------------------------------------------------------------------- metrics table


def runs(count: int) -> dict[str, dict[str, Any]]:
    names = ["kd", "xd", "knee", "ce_head", "student", "xd_2", "kd_2", "xd_3"][:count]
    return {run: {"test": {name: value(i, name) for name in METRICS}} for i, run in enumerate(names)}


@pytest.mark.parametrize("count", [1, 3, 5, 8])
def test_metrics_table_shows_every_metric_name_whole_at_80_columns(count):
    shown = runs(count)
    text = render(metrics_table("digits: KD vs XDistillation, test split (12 s)", shown))
    assert_readable(text)
    assert PLUGIN_METRIC in METRICS
    for name in METRICS:  # each name whole, in the first column
        assert re.search(rf"^│ {re.escape(name)} +│", text, re.MULTILINE), name
    for run, metrics in shown.items():
        assert run in text
        for number in metrics["test"].values():
            assert (f"{number:.3f}" if isinstance(number, float) else str(number)) in text
    assert ("* skill <= 0" in text) == (count > 1)  # the second run's skills are negative: marked, explained


def test_metrics_table_puts_runs_side_by_side_while_they_fit():
    table = metrics_table("t", runs(3))
    assert isinstance(table, Fitted)
    assert header_cells(render(table)) == ["metric", "kd", "xd", "knee"]
    assert header_cells(render(metrics_table("t", runs(8)))) == ["metric", "run", "value"]


# ----------------------------------------------------------------------------- Pareto front


def front(objectives: tuple[str, ...]) -> list[dict[str, Any]]:
    return [
        {
            "trial_id": trial,
            "method": "xd" if i % 2 else "kd",
            **{f"{split}_{name}": value(i + j, name) for j, split in enumerate(("val", "test")) for name in METRICS},
        }
        for i, trial in enumerate(TRIALS)
    ]


OBJECTIVE_SETS = [
    ("accuracy", "fidelity"),
    ("accuracy", "fidelity", "fidelity_posthoc"),
    ("accuracy", "fidelity", "params", "latency_ms", "deletion_auc_head"),
    tuple(METRICS),
]


@pytest.mark.parametrize("objectives", OBJECTIVE_SETS, ids=len)
def test_front_table_is_readable_at_80_columns_for_any_objectives(objectives):
    rows = front(objectives)
    text = render(front_table(rows, f"Pareto front of runs/demo/search ({len(rows)} students)", objectives))
    assert_readable(text)
    shown = (*objectives, *(["fidelity_skill"] if "fidelity_skill" not in objectives else []))
    headers = header_cells(text)
    assert len(headers) == len(set(headers)), headers
    if headers[:3] == ["trial", "method", "metric"]:  # vertical: full names, one row per metric
        for name in shown:
            assert re.search(rf"│ {re.escape(name)} +│", text), name
    else:  # wide: short names over the split, all explained by the caption
        entries = legend_entries(text)
        assert set(entries.values()) <= set(METRICS)
        metric_headers = headers[2:]
        assert len(metric_headers) == 2 * len(shown)
        for header in metric_headers:
            short, split = header.split(" ")
            assert split in ("val", "test")
            assert entries.get(short, short) in shown, header
        assert {entries.get(h.split(" ")[0], h.split(" ")[0]) for h in metric_headers} == set(shown)
    for row in rows:
        assert row["trial_id"] in text
        for name in shown:
            for split in ("val", "test"):
                number = row[f"{split}_{name}"]
                assert (f"{number:.3f}" if isinstance(number, float) else str(number)) in text, (name, split)


def test_front_table_of_the_default_objectives_is_wide_at_80_columns():
    text = render(front_table(front(("accuracy", "fidelity")), "Pareto front (4 students)", ("accuracy", "fidelity")))
    assert header_cells(text) == [
        "trial", "method", "acc val", "fid val", "fid_ski val", "acc test", "fid test", "fid_ski test",
    ]  # fmt: skip
    assert legend_entries(text) == {"acc": "accuracy", "fid": "fidelity", "fid_ski": "fidelity_skill"}
    assert "* skill <= 0" in text


# ----------------------------------------------------------------------------- items


def test_items_table_keeps_brackets_and_long_paths_whole():
    path = "/home/user/.cache/xkd/explanations/gradcam-0123456789abcdef0123456789abcdef-train.pt"
    text = render(items_table("teacher vgg-0123abcd (12.3 s)", {"test_accuracy": 0.9812, "explanations[train]": path}))
    assert_readable(text)
    assert "explanations[train]" in text and "0.9812" in text
    value_column = "".join(line.split("│")[2].strip() for line in text.splitlines() if line.count("│") == 3)
    assert path in value_column


# ----------------------------------------------------------------------------- live table


def worker_report(epoch: int, index: int) -> dict[str, Any]:
    """What ``ray_train.worker_loop`` passes to ``ray.train.report`` after an epoch: the epoch's
    losses, the validation metrics, then its own bookkeeping (the same keys, in its order)."""
    record: dict[str, Any] = {"train_ce": 0.9, "train_kd": 0.4, "train_explanation": 0.2, "train_total": 1.5}
    record.update({name: value(index, name) for name in METRICS})
    record.update({"epoch": epoch, "start_epoch": 0, "workers": 1, "diverged": False})
    record["wall_time"] = 1.7e9 + epoch
    return record


def through_tune(report: dict[str, Any], trial_id: str, iteration: int, sampled: dict[str, Any]) -> dict[str, Any]:
    """The result ``Callback.on_trial_result`` receives for one report: Ray's own
    ``TuneReportCallback.after_report`` (rank 0's metrics plus the checkpoint's path) and the
    fields Tune adds (``training_iteration``, ``config``: the sampled values, ...)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    queued: list[dict[str, Any]] = []
    callback = object.__new__(TuneReportCallback)  # its __init__ needs a live Tune session
    callback._training_actor_item_queue = SimpleNamespace(put=queued.append)
    checkpoint = SimpleNamespace(path=f"/runs/exp/train/trial-{trial_id}/checkpoint_{iteration:06d}")
    callback.after_report(None, [report, dict(report)], checkpoint if "epoch" in report else None)
    (metrics,) = queued if queued else [report]
    return {
        **metrics,
        "checkpoint_dir_name": None,
        "done": False,
        "training_iteration": iteration,
        "trial_id": trial_id,
        "date": "2026-11-26_03-02-30",
        "timestamp": 1_795_000_000 + iteration,
        "time_this_iter_s": 4.2,
        "time_total_s": 4.2 * iteration,
        "pid": 5605,
        "hostname": "node",
        "node_ip": "10.0.0.1",
        "config": dict(sampled),
        "time_since_restore": 4.2 * iteration,
        "iterations_since_restore": iteration,
    }


def driver_report(index: int, epochs: int) -> dict[str, Any]:
    """What ``ray_trial.trial_driver`` reports once the trial's Ray Train run has ended."""
    config = ExperimentConfig().with_overrides({"distill.epochs": epochs}).to_dict()
    return {
        **{name: value(index, name) for name in METRICS},
        "status": "ok",
        "epochs_trained": epochs,
        "student_dir": "/runs/exp/students/x",
        "resumed_from_checkpoint": 0,
        "experiment_config": config,
    }


SAMPLED = {"distill.method": "xd", "distill.temperature": 4.0, "distill.beta": 1.2, "student.ae_depth": 2}


def test_live_table_shows_each_trials_epoch_out_of_its_total():
    latest = {
        # epoch index 2 of the search's 12 (Tune's config does not sample distill.epochs)
        TRIALS[0]: through_tune(worker_report(2, 0), TRIALS[0], 3, SAMPLED),
        # the space samples distill.epochs: Tune's config says 20
        TRIALS[1]: through_tune(worker_report(4, 1), TRIALS[1], 5, {**SAMPLED, "distill.epochs": 20}),
        # finished: the driver's report alone still says how many epochs ran
        TRIALS[2]: through_tune(driver_report(2, 12), TRIALS[2], 13, SAMPLED),
        # not reporting yet
        TRIALS[3]: {},
    }
    table = live_trials_table("search /runs/exp", latest, {TRIALS[2]}, ("accuracy", "fidelity"), epochs=12)
    text = render(table)
    assert_readable(text)
    assert header_cells(text) == ["trial", "status", "epoch", "acc", "fid", "front"]
    assert legend_entries(text) == {"acc": "accuracy", "fid": "fidelity"}
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in text.splitlines()[4:8]}
    assert rows[TRIALS[0]][:2] == ["running", "3/12"]
    assert rows[TRIALS[1]][:2] == ["running", "5/20"]
    assert rows[TRIALS[2]] == ["ok", "12/12", f"{value(2, 'accuracy'):.3f}", f"{value(2, 'fidelity'):.3f}", "*"]
    assert rows[TRIALS[3]] == ["running", "-", "-", "-", ""]
    assert epoch_progress(latest[TRIALS[0]]) == "3"  # total unknown: the count alone


def test_live_table_marks_a_diverged_report():
    report = {**worker_report(1, 0), "diverged": True, "accuracy": math.nan, "fidelity": math.nan}
    text = render(
        live_trials_table(
            "s", {TRIALS[0]: through_tune(report, TRIALS[0], 2, SAMPLED)}, set(), ("accuracy", "fidelity")
        )
    )
    assert "diverged" in text and "nan" in text and "│ 2 " in text


@pytest.mark.parametrize("objectives", OBJECTIVE_SETS, ids=len)
def test_live_table_is_readable_at_80_columns_for_any_objectives(objectives):
    latest = {trial: through_tune(worker_report(i, i), trial, i + 1, SAMPLED) for i, trial in enumerate(TRIALS)}
    text = render(live_trials_table("search /home/user/runs/demo/search", latest, {TRIALS[1]}, objectives, epochs=12))
    assert_readable(text)
    headers = header_cells(text)
    assert len(headers) == len(set(headers))
    if "metric" in headers:
        for name in objectives:
            assert re.search(rf"│ {re.escape(name)} +│", text), name
    else:
        entries = legend_entries(text)
        assert [entries.get(h, h) for h in headers[3:-1]] == list(objectives)
    for i, trial in enumerate(TRIALS):
        assert re.search(rf"│ {trial} +│ running +│ {i + 1}/12 ", text), trial
        for name in objectives:
            number = value(i, name)
            assert (f"{number:.3f}" if isinstance(number, float) else str(number)) in text


# ----------------------------------------------------------------------------- the callback


def test_live_callback_keeps_the_epoch_when_the_driver_reports_last(tmp_path):
    """The bug: the driver's final report (no ``epoch``) replaced the workers' ones, so every
    finished trial showed an empty epoch. The callback merges a trial's reports; the search's
    distill.epochs comes from the experiment's manifest."""
    from xkd_ray.cluster.progress_callbacks import LiveTableCallback
    from xkd_ray.config.space import load_search_space
    from xkd_ray.pareto.experiment_folder import open_experiment
    from xkd_ray.pareto.front import Objectives

    spec = load_search_space(SMOKE)
    experiment = tmp_path / "exp"
    open_experiment(experiment, spec, resume=False, allow_space_change=False, trust=False)
    callback = LiveTableCallback(str(experiment), Objectives())
    callback._epochs = callback._search_epochs()
    assert callback._epochs == spec.base.distill.epochs == 2
    trial = SimpleNamespace(trial_id=TRIALS[0], last_result=None)
    for iteration, epoch in enumerate(range(2), start=1):
        callback.on_trial_result(
            iteration, [], trial, through_tune(worker_report(epoch, 0), TRIALS[0], iteration, SAMPLED)
        )
    final = through_tune(driver_report(0, 2), TRIALS[0], 3, SAMPLED)
    del final["epochs_trained"]  # the epoch must survive even without the driver's count
    callback.on_trial_result(3, [], trial, final)
    trial.last_result = final
    callback.on_trial_complete(3, [], trial)
    stopped = SimpleNamespace(trial_id=TRIALS[1], last_result=None)
    callback.on_trial_result(1, [], stopped, through_tune(worker_report(0, 1), TRIALS[1], 1, SAMPLED))
    stopped.last_result = callback._latest[TRIALS[1]]
    callback.on_trial_complete(1, [], stopped)
    text = render(callback._render())
    assert_readable(text)
    assert re.search(rf"│ {TRIALS[0]} +│ ok +│ 2/2 ", text), text
    assert re.search(rf"│ {TRIALS[1]} +│ stopped +│ 1/2 ", text), text
    assert Path(experiment, "experiment.json").exists()
