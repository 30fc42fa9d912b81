"""The search's fault matrix on one real local Ray: a killed worker, a failing trial driver and a
diverging trial in the same search, which must go on and leave a consistent Pareto registry."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import FAULTY_SEARCH, SMOKE, injected_faults
from xkd_ray.config.space import load_search_space
from xkd_ray.core.metrics import non_dominated
from xkd_ray.pareto.front import load_pareto_student, read_trials

pytestmark = FAULTY_SEARCH  # both tests read each mode's search: build it in one worker only

# Each point is told apart by its temperature; the fault rules (xkd_ray.testing.faults) key on it.
HEALTHY = {"distill.method": "xd", "distill.lr": 0.005, "distill.temperature": 2.0}
POINTS = {
    "healthy": HEALTHY,
    "worker_killed": {**HEALTHY, "distill.temperature": 3.0},  # one worker SIGKILLs itself at epoch 1
    "diverges": {**HEALTHY, "distill.lr": 1e6},  # NaN/inf loss in the first epoch
    "driver_fails": {**HEALTHY, "distill.method": "kd", "distill.temperature": 5.0},  # raises on every attempt
}
RULES = [
    {"fault": "kill_worker", "epoch": 1, "when": {"distill.temperature": 3.0}},
    {"fault": "fail_driver", "when": {"distill.temperature": 5.0}},
]


# A failing driver fails before the trial chooses how to train, and a healthy trial is covered by
# the one whose worker is killed and comes back: as Ray Train runs only the two faults that take
# another path there (two trials, not four and a retry).
MODES = {"in_driver": (True, tuple(POINTS)), "ray_train": (False, ("worker_killed", "diverges"))}


@pytest.fixture(scope="module", params=list(MODES))
def faulty_search(ray_local, cache_dir, tmp_path_factory, request):
    """Once with one-worker trials trained in their Tune driver (the default: a killed worker is
    the trial's process, retried by Tune from its checkpoint), once as Ray Train runs (a killed
    worker is restarted by Ray Train inside the trial). Returns the experiment folder, the search's
    summary and the kinds of point it ran."""
    from xkd_ray.cluster.ray_search import run_search

    in_driver, kinds = MODES[request.param]
    tmp = tmp_path_factory.mktemp("faults")
    raw = yaml.safe_load(SMOKE.read_text())
    raw["base"]["explain"]["cache_dir"] = cache_dir
    raw["space"].update({"distill.lr": {"choice": [0.005, 1e6]}})
    points = [POINTS[kind] for kind in kinds]
    raw["search"].update({"trials": len(points), "initial_points": points, "max_failures": 1})
    raw["search"]["one_worker_in_driver"] = in_driver
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    experiment = tmp / "experiment"
    with injected_faults(RULES):
        summary = run_search(load_search_space(path), experiment, live=False)
    return experiment, summary, kinds


def _kind(row: dict) -> str:
    config = json.loads(row["config"])
    if config["distill"]["lr"] > 1:
        return "diverges"
    by_temperature = {3.0: "worker_killed", 5.0: "driver_fails"}
    return by_temperature.get(config["distill"]["temperature"], "healthy")


@pytest.mark.slow
def test_each_fault_is_recorded_and_the_search_goes_on(faulty_search):
    experiment, summary, kinds = faulty_search
    rows = {_kind(row): row for row in read_trials(experiment)}
    assert set(rows) == set(kinds) and summary["trials"] == len(kinds)
    # The killed worker's trial resumed from its checkpoint (not from scratch) and finished.
    assert rows["worker_killed"]["status"] == "ok" and rows["worker_killed"]["resumed_from_checkpoint"] == 1
    assert rows["diverges"]["status"] == "diverged" and rows["diverges"]["val_accuracy"] is None
    if "healthy" in kinds:  # the in-driver search: also a healthy trial and a failing driver
        assert rows["healthy"]["status"] == "ok" and rows["healthy"]["resumed_from_checkpoint"] == 0
        # Retried once (search.max_failures=1), then recorded as errored with its full config.
        errored = rows["driver_fails"]
        assert errored["status"] == "errored" and errored["val_accuracy"] is None
        assert errored["error"].startswith("failed 2 time(s)") and "injected fault: fail_driver" in errored["error"]
        assert json.loads(errored["config"])["distill"]["method"] == "kd"


@pytest.mark.slow
def test_registry_after_faults_is_consistent_and_loadable(faulty_search):
    experiment, summary, _ = faulty_search
    rows = read_trials(experiment)
    ok = [r for r in rows if r["status"] == "ok"]
    expected = {ok[i]["trial_id"] for i in non_dominated([(r["val_accuracy"], r["val_fidelity"]) for r in ok])}
    front = pq.read_table(experiment / "pareto" / "front.parquet").to_pylist()
    assert {r["trial_id"] for r in front} == expected and summary["front_size"] == len(expected)
    assert {p.name for p in (experiment / "pareto").iterdir() if p.is_dir()} == expected
    for prefer in ("knee", "accuracy", "fidelity"):
        student = load_pareto_student(experiment, prefer=prefer)
        assert student.path.name in expected and "test" in student.metrics
    # Nothing half-written: no temporary files left anywhere in the registry.
    leftovers = [name for _, _, files in os.walk(experiment / "pareto") for name in files if name.endswith(".tmp")]
    assert leftovers == [] and not list(experiment.glob(".trials.parquet.*"))
