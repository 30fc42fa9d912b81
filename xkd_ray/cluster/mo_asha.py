"""MO-ASHA (Schmucker et al. 2021, arXiv 2106.12639): asynchronous successive halving for several objectives.

At each rung level ``grace * eta**k < max_t`` a trial goes on only if it is in the top ``floor(n / eta)`` of
the ``n`` trials recorded at that rung so far, ranked by non-dominated sorting; ties within a rank go to the
larger NSGA-II crowding distance, then to the earlier arrival. The ranking math is pure (no Ray), in
``xkd_ray.core.metrics`` beside the front's own non-dominated test, so both use one definition of dominance.

What Ray's ``OptunaSearch`` tells Optuna about a trial this scheduler stops (ray 2.60,
``ray/tune/search/optuna/optuna_search.py``, ``on_trial_complete``): Tune's ``stop_trial`` calls
``search_alg.on_trial_complete(trial_id, result=trial.last_result)``; OptunaSearch reads
``val = [result.get(m) for m in self.metric]``, keeps ``ot_trial_state = COMPLETE`` unless ``val is None``,
and calls ``study.tell(ot_trial, val, state=COMPLETE)``. So a stopped trial enters the study as COMPLETE with
its truncated (rung-time) values, and the sampler learns them as final. (Multi-objective Optuna has no
``Trial.report``, and ``tell`` refuses values with PRUNED.) ``PruneAwareOptunaSearch`` tells PRUNED instead.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Container, Sequence
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from xkd_ray.core.metrics import Point, crowding_distances, non_dominated_ranks

__all__ = ["MOASHAScheduler", "PruneAwareOptunaSearch", "crowding_distances", "non_dominated_ranks", "promotable"]


def promotable(
    points_at_rung: Sequence[Point], candidate_index: int, eta: int, directions: Sequence[str] | None = None
) -> bool:
    """Whether the candidate is in the top ``floor(n / eta)`` of the rung (n includes it); with fewer than
    ``eta`` points it goes on, as in ASHA. ``directions`` defaults to minimising every objective."""
    n = len(points_at_rung)
    if n < eta:
        return True
    directions = directions or ["min"] * len(points_at_rung[0])
    ranks = non_dominated_ranks(points_at_rung, directions)
    crowd = crowding_distances(points_at_rung, directions, ranks)
    order = sorted(range(n), key=lambda i: (ranks[i], -crowd[i], i))
    return order.index(candidate_index) < n // eta


class MOASHAScheduler(FIFOScheduler):
    """Ray Tune scheduler: MO-ASHA over ``objectives`` = [(metric name as reported, "max" | "min"), ...].

    ``stopped`` maps each trial this scheduler stopped early to ``{"rung", "time", "metrics"}``, so a caller
    can mark it ``status: stopped``. Rungs lie strictly below ``max_t`` (the trial's last epoch): stopping a
    trial that has trained every epoch saves nothing and loses its final report, so past the last rung a
    trial always runs to its own end (unlike Ray's ASHA, which stops trials at ``max_t``)."""

    def __init__(
        self,
        objectives: Sequence[tuple[str, str]],
        time_attr: str = "training_iteration",
        grace_period: int = 1,
        reduction_factor: int = 3,
        max_t: int = 100,
        protected: Callable[[dict], bool] | None = None,
    ) -> None:
        super().__init__()
        if not objectives or any(d not in ("max", "min") for _, d in objectives):
            raise ValueError(f"objectives must be a non-empty list of (metric, 'max'|'min'), got {objectives!r}")
        if reduction_factor < 2 or grace_period <= 0 or max_t <= grace_period:
            raise ValueError("need reduction_factor >= 2 and 0 < grace_period < max_t")
        self._objectives = [(str(m), str(d)) for m, d in objectives]
        self._time_attr, self._eta, self._max_t = time_attr, int(reduction_factor), max_t
        levels, level = [], grace_period
        while level < max_t:
            levels.append(level)
            level *= reduction_factor
        self._rungs: dict[float, dict[str, tuple[float | None, ...]]] = {lv: {} for lv in levels}
        self.stopped: dict[str, dict[str, Any]] = {}
        # Trials whose config this says True for (the search's reference) are ranked, never stopped.
        self._protected = protected

    @property
    def rungs(self) -> dict[float, dict[str, tuple[float | None, ...]]]:
        """Rung level -> {trial_id: objective vector recorded there}, in arrival order."""
        return self._rungs

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Tune passes ``TuneConfig(metric, mode)`` here; accept none, or one of our own objectives."""
        if metric is None:
            return True
        return any(metric == m and mode in (None, d) for m, d in self._objectives)

    def _record(self, trial_id: str, time: float, result: dict) -> bool | None:
        """Record the trial at the highest rung it has reached, once (ASHA skips rungs a trial jumped over).
        Returns whether it may go on, or None if there was nothing new to decide."""
        reached = [lv for lv in self._rungs if lv <= time]
        if not reached or trial_id in self._rungs[reached[-1]]:
            return None
        rung = self._rungs[reached[-1]]
        rung[trial_id] = tuple(result.get(m) for m, _ in self._objectives)
        directions = [d for _, d in self._objectives]
        return promotable(list(rung.values()), len(rung) - 1, self._eta, directions)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        time = result.get(self._time_attr)
        if time is None:
            return TrialScheduler.CONTINUE
        keep = self._protected is not None and self._protected(trial.config)
        if self._record(trial.trial_id, time, result) is False and not keep:
            level = max(lv for lv in self._rungs if lv <= time)
            metrics = {m: result.get(m) for m, _ in self._objectives}
            self.stopped[trial.trial_id] = {"rung": level, "time": time, "metrics": metrics}
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        """A trial that ends on its own still counts at the rung it reached (no decision to make)."""
        if result and result.get(self._time_attr) is not None and result[self._time_attr] < self._max_t:
            self._record(trial.trial_id, result[self._time_attr], result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        """Rung records stay: they are the evidence later trials are compared against."""

    def debug_string(self) -> str:
        counts = ", ".join(f"{lv}: {len(r)}" for lv, r in self._rungs.items())
        return f"Using MO-ASHA: stopped={len(self.stopped)}, trials per rung {{{counts}}}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class PruneAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna PRUNED, not COMPLETE with truncated values, for trials that
    ``stopped_ids()`` names (e.g. ``lambda: scheduler.stopped``), so the sampler never learns rung-time
    scores as final. The truncated result is kept on the Optuna trial as user attribute ``stopped_result``."""

    def __init__(self, stopped_ids: Callable[[], Container[str]], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopped_ids = stopped_ids

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped = not error and trial_id in self._stopped_ids()
        if stopped and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            kept = {k: (result or {}).get(k) for k in [*metrics, "training_iteration"]}
            self._ot_trials[trial_id].set_user_attr("stopped_result", kept)
            result = None  # OptunaSearch tells PRUNED when there is no value and no error
        super().on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        """OptunaSearch pickles ``__dict__`` with plain pickle: leave out the provider (often a lambda, and live
        state of this run either way); ``restore`` then keeps the provider this object was built with."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump({k: v for k, v in self.__dict__.items() if k != "_stopped_ids"}, f)
