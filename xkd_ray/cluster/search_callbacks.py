"""The Pareto registry's Tune callback (``RegistryCallback``): records every finished trial, keeps
``pareto/`` and the dashboard gauges current, mirrors the registry to object storage. It runs in
the search's driver; what a person watching sees is in ``progress_callbacks``."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ray import tune

from xkd_ray.config.space import SearchSpec
from xkd_ray.core.checkpoints import atomic_write_json
from xkd_ray.core.metrics import METRICS
from xkd_ray.pareto.front import Objectives, read_trials, record_trial, update_registry
from xkd_ray.pareto.storage import Storage, upload_registry

GAUGE_REFRESH_S = 5.0
logger = logging.getLogger(__name__)


# The spec each experiment's search was started with in this process. Tuner.restore brings back the
# callbacks and the searcher pickled by the first run, with the space they were built with; after
# ``--allow-space-change`` they take the new one from here (they run in this driver process).
_CURRENT_SPECS: dict[str, SearchSpec] = {}


def register_spec(experiment: str | Path, spec: SearchSpec) -> None:
    _CURRENT_SPECS[str(Path(experiment).resolve())] = spec


def current_spec(experiment: str | Path, fallback: SearchSpec | None) -> SearchSpec | None:
    return _CURRENT_SPECS.get(str(Path(experiment).resolve()), fallback)


def _last_error_line(trial: Any) -> str:
    """The exception line of the trial's traceback, for trials.parquet. Tune writes it to the
    trial's local folder first and copies it to storage later (``get_error`` reads storage), so
    under load only the local file has it when ``on_trial_error`` runs: read that first."""
    text = ""
    for read in (lambda: Path(trial.error_file).read_text(), lambda: str(trial.get_error() or "")):
        try:
            text = read()
        except Exception as exc:  # the record of an error must never become a second error
            logger.debug("cannot read the error of trial %s: %s", trial.trial_id, exc)
            text = ""
        if text.strip():
            break
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:500]


class RegistryCallback(tune.Callback):
    """After every finished trial: record it, update the Pareto registry and the dashboard gauges.

    Holds only paths and the search spec (callbacks are pickled with the Tuner); it never loads
    the data: a front member's test metrics come from its student folder, written by its trial.
    """

    def __init__(self, experiment: str, spec: SearchSpec, storage: Storage | None = None) -> None:
        self.experiment = experiment
        self.spec = spec
        self.storage = storage
        self.objectives = Objectives.of(spec.search)
        self._gauges: dict[str, Any] = {}
        self._summary: dict[str, Any] = {}
        self._gauges_set_at = 0.0
        self._journal_uploaded = 0
        self._caught_up = False

    def setup(self, **info: Any) -> None:
        from ray.util.metrics import Gauge

        self.spec = current_spec(self.experiment, self.spec)  # a restored search's new space
        self.objectives = Objectives.of(self.spec.search)

        names = {
            "trials_finished": "finished trials",
            "front_size": "students on the Pareto front",
            "hypervolume": "hypervolume of the front (val accuracy x fidelity)",
            **{f"best_{name}": f"best val {name} on the front" for name in self.objectives.names},
        }
        try:
            self._gauges = {
                key: Gauge(f"xkd_{key}", description=text, tag_keys=("experiment",)) for key, text in names.items()
            }
        except Exception as exc:  # metrics are a nicety: never let them stop a search
            logger.warning("dashboard gauges unavailable (%s); the search goes on without them", exc)
            self._gauges = {}

    @staticmethod
    def _no_test_metrics(student: Any, record: dict[str, Any]) -> dict[str, float]:
        """Each trial evaluates its student on the test split itself (xkd_ray.cluster.ray_trial), so
        this driver never loads the data; a student without them (saved by an older version) is
        listed with its test metrics missing rather than evaluated here."""
        logger.warning(
            "a front student has no test metrics in its folder (%s); listed without", record.get("teacher_id")
        )
        return {}

    def _finish(self, row: dict[str, Any]) -> None:
        if self.storage is not None and row.get("student_dir"):  # fetch the student a trial put on storage
            local = Path(self.experiment) / row["student_dir"]
            self.storage.download(local, row["student_dir"])
            row = {**row, "student_dir": str(local)}
        record_trial(self.experiment, {**row, "finished_at": time.time()})
        self._summary = update_registry(self.experiment, self._no_test_metrics, self.objectives)
        differences = self.spec.cli_differences()
        if differences and self._summary.get("reference_config"):
            # The reference trains as `xkd distill` does, not as the space's base: say where they differ.
            self._summary["reference_config"]["trains_differently"] = differences
            atomic_write_json(Path(self.experiment) / "summary.json", self._summary)
        if self.storage is not None:
            upload_registry(self.storage, Path(self.experiment))
        self._set_gauges()

    def _set_gauges(self) -> None:
        tags = {"experiment": Path(self.experiment).name}
        for key, gauge in self._gauges.items():
            value = self._summary.get("trials" if key == "trials_finished" else key)
            if value is not None:
                gauge.set(float(value), tags=tags)
        self._gauges_set_at = time.monotonic()

    def _record_missed(self, iteration: int, trials: list, *, final_reports_only: bool = False) -> None:
        """Record every trial Tune holds as finished that the registry lacks: one that completed
        while the search was being interrupted (Tune saves it TERMINATED, but no callback ran), or,
        after ``--resume`` on another machine, any such trial of the interrupted run. Each once.

        ``final_reports_only`` (at the experiment's end): an interrupted search's cleanup marks
        every trial still running TERMINATED in memory without a callback (Ray 2.60
        ``TuneController._cleanup_trials``); its saved state keeps them RUNNING and ``--resume``
        trains them, so only a trial whose final report arrived is one that finished."""
        recorded = {row["trial_id"] for row in read_trials(self.experiment)}
        for trial in trials:
            if trial.trial_id in recorded or trial.status not in ("TERMINATED", "ERROR"):
                continue
            if final_reports_only and trial.status == "TERMINATED" and "status" not in (trial.last_result or {}):
                continue
            if trial.status == "TERMINATED":
                self.on_trial_complete(iteration, trials, trial)
            else:
                self.on_trial_error(iteration, trials, trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._record_missed(-1, trials, final_reports_only=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Ray 2.60 exports a gauge's value only for ~15 s after it was set (measured), so a
        dashboard would go blank between finished trials: set them again every few seconds.
        On object storage, the Optuna journal is uploaded whenever it grew: Tune's saved state holds
        the searcher, which reads the journal from the byte offset it had reached, so the journal on
        storage must never be older than that state."""
        if not getattr(self, "_caught_up", False):  # the first step after a (re)start (or an older pickle)
            self._record_missed(iteration, trials)
            self._caught_up = True
        if self.storage is not None:
            journal = Path(self.experiment) / "optuna.journal"
            size = journal.stat().st_size if journal.exists() else 0
            if size != self._journal_uploaded:
                self.storage.upload(journal, journal.name)
                self._journal_uploaded = size
        if self._gauges and self._summary and time.monotonic() - self._gauges_set_at > GAUGE_REFRESH_S:
            self._set_gauges()

    def _is_reference(self, trial: Any) -> bool:
        return self.spec.is_reference(trial.config)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial ended without an error: it finished (status ok or diverged, from its final
        report), or the scheduler stopped it early (no final report: its last epoch's metrics).

        A trial already recorded is kept as it was: after a SIGKILL, Tune's last saved state may
        predate a trial's end, so ``--resume`` runs it again and its driver replays the saved
        student's final report (``ray_trial.trial_driver``): recorded once, not twice."""
        if any(row["trial_id"] == trial.trial_id for row in read_trials(self.experiment)):
            logger.info("trial %s was recorded before the search restarted; kept as it was", trial.trial_id)
            return
        result = trial.last_result or {}
        status = result.get("status", "stopped")
        if status == "ok" and not all(math.isfinite(float(result.get(m, math.nan))) for m in self.objectives.names):
            status = "diverged"
        config = result.get("experiment_config") or self.spec.config_for(trial.config).to_dict()
        measured = status in ("ok", "stopped")
        row = {
            "trial_id": trial.trial_id,
            "method": config["distill"]["method"],
            "status": status,
            "config": config,
            "student_dir": result.get("student_dir"),
            "resumed_from_checkpoint": result.get("resumed_from_checkpoint"),
            "nodes": json.dumps(result["nodes"]) if result.get("nodes") else None,
            "epochs_trained": result.get("epochs_trained", int(result.get("epoch", -1)) + 1),
            "reference": self._is_reference(trial),
            **{f"val_{name}": result.get(name) if measured else None for name in METRICS},
        }
        row["feasible"] = self.objectives.feasible(row) if measured else None
        self._finish(row)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Called once the trial's retries (``search.max_failures``) are used up."""
        config = self.spec.config_for(trial.config)
        self._finish(
            {
                "trial_id": trial.trial_id,
                "method": config.distill.method,
                "status": "errored",
                "config": config.to_dict(),
                "error": f"failed {trial.num_failures} time(s): {_last_error_line(trial)}",
                "reference": self._is_reference(trial),
            }
        )
