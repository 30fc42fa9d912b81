"""MO-ASHA: the pure ranking/promotion math against brute force and hand-made rungs, the scheduler's
bookkeeping on fake trials, and two real local Ray Tune runs (grid search; OptunaSearch + PRUNED)."""

from __future__ import annotations

import math
import time
from functools import cache
from types import SimpleNamespace

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from xkd_ray.cluster.mo_asha import (
    MOASHAScheduler,
    PruneAwareOptunaSearch,
    crowding_distances,
    non_dominated_ranks,
    promotable,
)

OBJECTIVES = [("acc", "max"), ("cost", "min")]
DIRS = [d for _, d in OBJECTIVES]


def brute_ranks(points: list[tuple[float, ...]], directions: list[str]) -> list[int]:
    """Rank = length of the longest chain of dominators above a point (0 when none dominates it)."""

    def better_eq(a: float, b: float, d: str) -> bool:
        return a >= b if d == "max" else a <= b

    def dominates(a, b) -> bool:
        return all(better_eq(x, y, d) for x, y, d in zip(a, b, directions, strict=True)) and a != b

    @cache
    def rank(i: int) -> int:
        dominators = [j for j in range(len(points)) if dominates(points[j], points[i])]
        return 1 + max(rank(j) for j in dominators) if dominators else 0

    return [rank(i) for i in range(len(points))]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 3).flatmap(
        lambda m: st.tuples(
            st.lists(st.sampled_from(["max", "min"]), min_size=m, max_size=m),
            st.lists(st.tuples(*[st.integers(0, 4)] * m), min_size=0, max_size=14),
        )
    )
)
def test_ranks_match_brute_force(case):
    """Small integer grids give ties, duplicates and long dominance chains; directions are mixed."""
    directions, points = case
    assert non_dominated_ranks(points, directions) == brute_ranks(points, directions)


def test_missing_metrics_rank_after_every_complete_point():
    points = [(0.9, None), (0.1, 9.0), (math.nan, 0.0), (0.5, 1.0), (float("inf"), 0.0)]
    ranks = non_dominated_ranks(points, DIRS)
    complete = [ranks[1], ranks[3]]
    assert max(complete) < min(ranks[0], ranks[2], ranks[4])
    assert ranks[3] == 0 and ranks[1] == 1  # (0.5, 1) dominates (0.1, 9)


def test_crowding_prefers_front_extremes():
    front = [(0.1, 1.0), (0.5, 2.0), (0.9, 3.0), (0.6, 2.9)]  # acc max, cost min: all non-dominated
    d = crowding_distances(front, DIRS)
    assert d[0] == d[2] == math.inf and 0 < d[3] < d[1]  # (0.5, 2) sits in the wider gap


def test_promotion_on_hand_made_rungs():
    # Fewer than eta trials at the rung: always continue, even when dominated.
    assert promotable([(0.9, 1.0), (0.1, 5.0)], 1, 3, DIRS)
    # Three trials, eta 3 -> top 1 continues.
    assert promotable([(0.1, 5.0), (0.2, 4.0), (0.9, 1.0)], 2, 3, DIRS)
    assert not promotable([(0.9, 1.0), (0.2, 4.0), (0.1, 5.0)], 2, 3, DIRS)
    # All on the front: the middle point loses the crowding tie-break; equal (infinite) extremes go by arrival.
    front = [(0.1, 1.0), (0.9, 3.0), (0.5, 2.0)]
    assert not promotable(front, 2, 3, DIRS)
    assert promotable(front, 0, 3, DIRS) and not promotable(front, 1, 3, DIRS)
    # Six trials -> top 2: the two extremes of the 3-point front go on; its middle and the dominated stop.
    rung = [(0.9, 3.0), (0.3, 1.0), (0.5, 2.5), (0.2, 3.5), (0.4, 4.0), (0.6, 2.0)]
    assert [promotable(rung, i, 3, DIRS) for i in range(6)] == [True, True, False, False, False, False]
    # NaN/None count as worst: a NaN trial with the best cost still stops.
    assert not promotable([(0.2, 5.0), (0.3, 4.0), (math.nan, 0.0)], 2, 3, DIRS)
    assert not promotable([(0.2, 5.0), (0.3, 4.0), (0.9, None)], 2, 3, DIRS)
    assert promotable([(math.nan, 5.0), (None, 4.0), (0.01, 99.0)], 2, 3, DIRS)
    # Default directions: minimise everything.
    assert promotable([(3.0, 3.0), (2.0, 2.0), (1.0, 1.0)], 2, 3)


def _fake(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id)


def test_scheduler_bookkeeping_without_ray():
    sched = MOASHAScheduler(OBJECTIVES, grace_period=1, reduction_factor=3, max_t=9)
    assert list(sched.rungs) == [1, 3]
    first = [("a", 0.9, 1.0), ("b", 0.8, 2.0), ("c", 0.1, 5.0), ("d", 0.95, 0.5)]
    decisions = {tid: sched.on_trial_result(None, _fake(tid), {"training_iteration": 1, "acc": a, "cost": c})
                 for tid, a, c in first}  # fmt: skip
    assert decisions == {"a": "CONTINUE", "b": "CONTINUE", "c": "STOP", "d": "CONTINUE"}
    assert sched.stopped == {"c": {"rung": 1, "time": 1, "metrics": {"acc": 0.1, "cost": 5.0}}}
    # Between rungs nothing is decided; a repeated rung report or the completion call is not re-recorded.
    assert sched.on_trial_result(None, _fake("a"), {"training_iteration": 2, "acc": 0.0, "cost": 9.0}) == "CONTINUE"
    sched.on_trial_complete(None, _fake("c"), {"training_iteration": 1, "acc": 0.1, "cost": 5.0})
    assert len(sched.rungs[1]) == 4
    # A trial that jumps past rung 1 is recorded only at rung 3 (as Ray's ASHA does), and time is kept.
    assert sched.on_trial_result(None, _fake("e"), {"training_iteration": 4, "acc": 0.5, "cost": 1.0}) == "CONTINUE"
    assert "e" in sched.rungs[3] and "e" not in sched.rungs[1]
    # At or past max_t (the last epoch) nothing is decided: the trial finishes on its own, even a bad one.
    assert sched.on_trial_result(None, _fake("a"), {"training_iteration": 9, "acc": 0.0, "cost": 99}) == "CONTINUE"
    assert "a" not in sched.stopped
    assert sched.on_trial_result(None, _fake("x"), {"acc": 1.0}) == "CONTINUE"  # no time attribute yet
    assert sched.set_search_properties(None, None) and sched.set_search_properties("acc", "max")
    assert not sched.set_search_properties("acc", "min") and not sched.set_search_properties("loss", "min")
    assert "stopped=1" in sched.debug_string()
    with pytest.raises(ValueError):
        MOASHAScheduler([("acc", "up")])
    with pytest.raises(ValueError):
        MOASHAScheduler(OBJECTIVES, reduction_factor=1)


def test_optuna_search_default_tells_complete_and_subclass_tells_pruned():
    """The behaviour the module docstring describes, on OptunaSearch itself (no Ray run needed)."""
    space = {"q": tune.uniform(0, 1)}
    result = {"acc": 0.3, "cost": 2.0, "training_iteration": 1}
    plain = OptunaSearch(space, metric=["acc", "cost"], mode=["max", "min"], seed=0)
    plain.suggest("t0")
    plain.on_trial_complete("t0", result=result)
    told = plain._ot_study.trials[0]
    assert told.state == optuna.trial.TrialState.COMPLETE and told.values == [0.3, 2.0]

    aware = PruneAwareOptunaSearch(lambda: {"t0"}, space, metric=["acc", "cost"], mode=["max", "min"], seed=0)
    aware.suggest("t0"), aware.suggest("t1")
    aware.on_trial_complete("t0", result=result)
    aware.on_trial_complete("t1", result={**result, "training_iteration": 9})
    stopped, finished = aware._ot_study.trials
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.values is None
    assert stopped.user_attrs["stopped_result"] == result
    assert finished.state == optuna.trial.TrialState.COMPLETE


def _trainable(config: dict) -> None:
    q, c = config["pair"] if "pair" in config else (config["q"], config["c"])
    for it in range(1, 10):
        time.sleep(0.01)
        tune.report({"acc": q * it / 9, "cost": c * (1 + 1 / it)})


PAIRS = [(0.9, 0.2), (0.5, 0.5), (0.3, 0.8), (0.8, 0.3), (0.2, 0.9), (0.7, 0.1), (0.4, 0.6), (0.6, 0.4)]


def _fit(tmp_path, scheduler, **tune_config):
    tuner = tune.Tuner(
        _trainable,
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True, **tune_config),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="mo_asha", verbose=0),
        **({} if "search_alg" in tune_config else {"param_space": {"pair": tune.grid_search(PAIRS)}}),
    )
    grid = tuner.fit()
    assert not grid.errors
    return {r.metrics["trial_id"]: r.metrics for r in grid}


def _dominated(a, b) -> bool:
    """b dominates a (acc max, cost min)."""
    return b[0] >= a[0] and b[1] <= a[1] and tuple(a) != tuple(b)


def test_real_ray_tune_run_stops_at_rungs(ray_local, tmp_path):
    sched = MOASHAScheduler(OBJECTIVES, grace_period=1, reduction_factor=3, max_t=9)
    last = _fit(tmp_path, sched)
    assert len(last) == 8 and sched.stopped, sched.debug_string()
    for tid, metrics in last.items():
        if tid in sched.stopped:
            record = sched.stopped[tid]
            assert record["rung"] in (1, 3) and record["time"] == record["rung"] == metrics["training_iteration"]
            assert record["metrics"] == {"acc": metrics["acc"], "cost": metrics["cost"]}
        else:
            assert metrics["training_iteration"] == 9
    assert len(sched.stopped) < 8 and set(sched.rungs[1]) == set(last)  # every trial reported iteration 1
    assert any(r["rung"] == 1 for r in sched.stopped.values())  # so the check below is not vacuous at rung 1
    for level, rung in sched.rungs.items():
        finishers = [v for tid, v in rung.items() if tid not in sched.stopped]
        stopped_here = [v for tid, v in rung.items() if sched.stopped.get(tid, {}).get("rung") == level]
        if finishers and stopped_here:
            assert not all(any(_dominated(f, s) for s in stopped_here) for f in finishers), (level, rung)


def test_real_run_with_optuna_marks_stopped_trials_pruned(ray_local, tmp_path):
    sched = MOASHAScheduler(OBJECTIVES, grace_period=1, reduction_factor=3, max_t=9)
    searcher = PruneAwareOptunaSearch(
        lambda: sched.stopped,
        {"q": tune.uniform(0, 1), "c": tune.uniform(0, 1)},
        metric=["acc", "cost"],
        mode=["max", "min"],
        points_to_evaluate=[{"q": q, "c": c} for q, c in PAIRS],
        seed=0,
    )
    last = _fit(tmp_path, sched, search_alg=searcher, num_samples=len(PAIRS))
    assert sched.stopped and len(sched.stopped) < len(last)
    states = {tid: searcher._ot_study.trials[ot.number] for tid, ot in searcher._ot_trials.items()}
    for tid, metrics in last.items():
        told = states[tid]
        if tid in sched.stopped:
            assert told.state == optuna.trial.TrialState.PRUNED and told.values is None
            assert told.user_attrs["stopped_result"]["training_iteration"] == sched.stopped[tid]["time"]
        else:
            assert told.state == optuna.trial.TrialState.COMPLETE
            assert told.values == pytest.approx([metrics["acc"], metrics["cost"]])


def test_prune_aware_search_saves_and_restores_without_its_provider(tmp_path):
    """Tune checkpoints the searcher with plain pickle; a lambda provider must not break that."""
    space = {"q": tune.uniform(0, 1)}
    aware = PruneAwareOptunaSearch(lambda: {"t0"}, space, metric=["acc", "cost"], mode=["max", "min"], seed=0)
    aware.suggest("t0")
    aware.save(str(tmp_path / "s.pkl"))
    fresh = PruneAwareOptunaSearch(lambda: {"t0"}, space, metric=["acc", "cost"], mode=["max", "min"], seed=0)
    fresh.restore(str(tmp_path / "s.pkl"))
    fresh.on_trial_complete("t0", result={"acc": 0.3, "cost": 2.0, "training_iteration": 1})
    assert fresh._ot_study.trials[0].state == optuna.trial.TrialState.PRUNED
