"""What a person watching a search sees, as Tune callbacks in the search's driver: the live trials
table on a terminal (``LiveTableCallback``) and plain log lines where the output is a file
(``ProgressLogCallback``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray import tune
from rich.console import Console
from rich.live import Live

from xkd_ray.pareto.display import live_trials_table
from xkd_ray.pareto.front import Objectives, front_rows, read_trials

logger = logging.getLogger(__name__)


class LiveTableCallback(tune.Callback):
    """A rich live table of trials and the current front, redrawn on every report.

    A trial's row merges all its reports. Tune passes each Ray Train report on as a result
    (``TuneReportCallback``): per epoch, the workers' record with ``epoch`` (0-based) and the
    validation metrics (``ray_train.worker_loop``), plus Tune's ``training_iteration`` and
    ``config`` (the sampled values); last, the driver's report (``status``, ``epochs_trained``,
    ``experiment_config``) has no ``epoch``: kept alone, it blanked the epoch column of every
    finished trial."""

    def __init__(self, experiment: str, objectives: Objectives) -> None:
        self.experiment = experiment
        self.objectives = objectives
        self._live: Live | None = None
        self._latest: dict[str, dict[str, Any]] = {}
        self._epochs: int | None = None

    def _search_epochs(self) -> int | None:
        """The search's ``distill.epochs`` (a fixed space value, else the base config's), from the
        experiment's manifest; None when it cannot be read (the table then counts epochs only)."""
        from xkd_ray.pareto.experiment_folder import read_manifest

        try:
            spec = (read_manifest(Path(self.experiment)) or {})["spec"]
            fixed = spec.get("space", {}).get("distill.epochs") or {}
            if fixed.get("kind") == "fixed":
                return int(fixed["value"])
            return None if fixed else int(spec["base"]["distill"]["epochs"])
        except Exception as exc:  # a display nicety must never stop a search
            logger.debug("live table: no epoch budget from the manifest (%s)", exc)
            return None

    def _render(self) -> Any:
        front = {row["trial_id"] for row in front_rows(read_trials(self.experiment), self.objectives)}
        return live_trials_table(
            f"search {self.experiment}", self._latest, front, self.objectives.names, epochs=self._epochs
        )

    def _update(self, trial_id: str, result: dict[str, Any]) -> None:
        self._latest[trial_id] = {**self._latest.get(trial_id, {}), **result}
        if self._live is not None:
            self._live.update(self._render())

    def setup(self, **info: Any) -> None:
        self._epochs = self._search_epochs()
        self._live = Live(self._render(), console=Console(), refresh_per_second=2, transient=False)
        self._live.start()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._update(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Without a final report (no ``status``), the scheduler stopped the trial early."""
        self._update(trial.trial_id, {"status": (trial.last_result or {}).get("status", "stopped")})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial.trial_id, {"status": "errored"})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._live is not None:
            self._live.stop()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "objectives": self.objectives,
            "_live": None,
            "_latest": {},
            "_epochs": None,
        }


PROGRESS_EVERY_S = 30.0


class ProgressLogCallback(tune.Callback):
    """Plain log lines for a search whose output is a file (``ray job logs``, a redirect), where
    the live table is off: one line per finished trial, and at most every ``every_s`` seconds a
    line with trials done/running/stopped, the best value per objective, hypervolume and an ETA.
    Reads ``summary.json``, which ``RegistryCallback`` (earlier in the list) has just written."""

    def __init__(self, experiment: str, objectives: Objectives, trials: int, every_s: float | None = None) -> None:
        self.experiment, self.objectives, self.trials = experiment, objectives, trials
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self._started = time.monotonic()
        self._logged_at = self._started
        self._finished_here = 0  # trials finished by this run (a resumed search counts from its restart)

    def _summary(self) -> dict[str, Any]:
        from xkd_ray.pareto.front import summary

        return summary(self.experiment) or {}

    def _finished(self, trial: Any, status: str) -> None:
        self._finished_here += 1
        result = trial.last_result or {}
        values = ", ".join(f"{name} {_shown(result.get(name))}" for name in self.objectives.names)
        # A finished trial's last result is its final report, one Tune iteration after its last
        # epoch: it says how many epochs it trained. A stopped one's is its last epoch's report.
        epochs = result.get("epochs_trained", result.get("training_iteration", 0))
        logger.info("trial %s %s after %s epoch(s): %s", trial.trial_id, status, epochs, values)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, (trial.last_result or {}).get("status", "stopped"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, "errored")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._logged_at < self.every_s:
            return
        self._logged_at = now
        summary = self._summary()
        done = int(summary.get("trials", 0))
        running = sum(trial.status == "RUNNING" for trial in trials)
        elapsed = now - self._started
        left = max(0, self.trials - done)
        eta = f"{elapsed / self._finished_here * left:.0f} s" if self._finished_here else "-"
        best = ", ".join(f"best {name} {_shown(summary.get(f'best_{name}'))}" for name in self.objectives.names)
        logger.info(
            "search: %d/%d trials done (%d stopped early), %d running; %s; hypervolume %s; ETA %s",
            done,
            self.trials,
            summary.get("trials_stopped", 0),
            running,
            best,
            _shown(summary.get("hypervolume")),
            eta,
        )


def _shown(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4g}"
