"""A search with chosen objectives (three, one minimised), a constraint, a reference config and
MO-ASHA early stopping, end to end on the session's local Ray."""

from __future__ import annotations

import json

import optuna
import pytest
from PIL import Image

from tests.conftest import smoke_space
from xkd_ray.cluster.ray_search import STUDY_NAME, run_search
from xkd_ray.config.space import load_search_space
from xkd_ray.core.metrics import hypervolume, non_dominated
from xkd_ray.core.models import StudentNet, parameter_count
from xkd_ray.pareto.front import list_pareto_students, load_pareto_student, read_trials, write_front_plot

OBJECTIVES = [("accuracy", "max"), ("fidelity_posthoc_skill", "max"), ("params", "min")]


@pytest.mark.slow
def test_objectives_constraints_reference_and_mo_asha(ray_local, cache_dir, tmp_path):
    # Students without a head (kd) are the smallest: a parameter bound only they meet, so every
    # xd trial is infeasible (recorded, never on the front).
    kd_params = parameter_count(StudentNet(1, 10, width=8))
    path = smoke_space(
        tmp_path, cache_dir, trials=6, max_concurrent_trials=2, seed=1,
        objectives=[{"metric": m, "direction": d} for m, d in OBJECTIVES],
        hypervolume_reference=[0.0, -10.0, 10 * kd_params],
        constraints=[f"params <= {kd_params}"],
        reference={"distill.method": "kd"},
        scheduler={"name": "mo_asha", "grace_epochs": 1, "reduction_factor": 2},
    )  # fmt: skip
    raw = path.read_text().replace("epochs: 2", "epochs: 4")
    path.write_text(raw)
    spec = load_search_space(path)
    assert spec.base.distill.epochs == 4
    experiment = tmp_path / "experiment"
    summary = run_search(spec, experiment, live=False)
    rows = {row["trial_id"]: row for row in read_trials(experiment)}
    assert len(rows) == 6

    # MO-ASHA stopped some trials early: recorded with their last metrics, never on the front.
    stopped = [r for r in rows.values() if r["status"] == "stopped"]
    assert stopped, [r["status"] for r in rows.values()]
    assert all(r["epochs_trained"] < 4 and r["val_accuracy"] is not None for r in stopped), [
        {k: r[k] for k in ("trial_id", "epochs_trained", "val_accuracy")} for r in stopped
    ]
    # The reference trains as `xkd distill --method kd` does (20 epochs, never stopped); the others the space's 4.
    assert all(r["epochs_trained"] == (20 if r["reference"] else 4) for r in rows.values() if r["status"] == "ok")
    # ... and Optuna was told PRUNED for them, COMPLETE with values for the finished ones.
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal"))
    )
    told = optuna.load_study(study_name=STUDY_NAME, storage=storage).trials
    states = [t.state for t in told]
    assert states.count(optuna.trial.TrialState.PRUNED) == len(stopped)
    assert states.count(optuna.trial.TrialState.COMPLETE) == sum(r["status"] == "ok" for r in rows.values())
    # The sampler's constraints_func reads each finished trial's violations (<= 0: satisfied).
    for trial in told:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            (violation,) = trial.user_attrs["constraint_violations"]
            assert (violation <= 0) == (trial.values[2] <= kd_params)

    # The constraint: heads make xd students infeasible; only feasible finished trials compete.
    finished = [r for r in rows.values() if r["status"] == "ok"]
    assert all(r["feasible"] == (r["val_params"] <= kd_params) for r in finished)
    assert any(not r["feasible"] for r in finished) or all(r["method"] == "kd" for r in finished)
    feasible = [r for r in finished if r["feasible"]]
    points = [tuple(r[f"val_{m}"] for m, _ in OBJECTIVES) for r in feasible]
    expected = {feasible[i]["trial_id"] for i in non_dominated(points, [d for _, d in OBJECTIVES])}
    front = list_pareto_students(experiment).to_pylist()
    assert {r["trial_id"] for r in front} == expected
    assert summary["hypervolume"] == pytest.approx(
        hypervolume(points, (0.0, -10.0, 10 * kd_params), [d for _, d in OBJECTIVES])
    )

    # The reference config ran first (an enqueued point) and the summary compares the front with it.
    reference = [r for r in rows.values() if r["reference"]]
    assert len(reference) == 1 and json.loads(reference[0]["config"])["distill"]["method"] == "kd"
    recorded = json.loads((experiment / "summary.json").read_text())
    assert recorded["objectives"]["names"] == [m for m, _ in OBJECTIVES]
    assert reference[0]["status"] == "ok" and json.loads(reference[0]["config"])["distill"]["epochs"] == 20
    if reference[0]["status"] == "ok":
        assert recorded["reference_config"]["trial_id"] == reference[0]["trial_id"]
        assert isinstance(recorded["reference_config"]["dominated_by_front"], bool)

    # Readers need no space file: the objectives come from summary.json.
    assert load_pareto_student(experiment, prefer="params").metrics["val"]["params"] == min(
        r["val_params"] for r in front
    )
    plot = write_front_plot(experiment, tmp_path / "front.png")
    width, height = Image.open(plot).size
    assert width > 2.5 * height  # three panels, one per pair of objectives
