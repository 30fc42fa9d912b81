"""Experiment tracking of a search where Ray Tune users look (``search.tracking``).

Tune's own logger callbacks, chosen here instead of Tune's automatic ones: JSON and CSV always
(``result.json`` per trial), TensorBoard with only the scalars it can show (Tune's default
``TBXLoggerCallback`` warns ``You are trying to log an invalid value`` for each list in a result,
e.g. the nodes a trial ran on), and MLflow (``MLflowLoggerCallback``): one run per trial, its
config and per-epoch metrics, all children of one parent run ``search`` that gets the front's
hypervolume, size and best values when the search ends. MLflow's store defaults to a SQLite file
in the experiment folder: ``mlflow ui --backend-store-uri sqlite:///EXPERIMENT/mlflow.db``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

from xkd_ray.config.space import SearchSpec

logger = logging.getLogger(__name__)
PARENT_RUN = "search"


def tracking_uri(spec: SearchSpec, experiment: Path) -> str:
    return spec.search.tracking_uri or f"sqlite:///{Path(experiment).resolve() / 'mlflow.db'}"


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    """The result without what TensorBoard cannot show (lists, strings, None), nested dicts kept."""
    kept: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            kept[key] = _scalars(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            kept[key] = value
    return kept


class ScalarTBXLoggerCallback(TBXLoggerCallback):
    """Tune's TensorBoard logger, given only scalars (no warning per list-valued result key)."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        super().log_trial_result(iteration, trial, {**_scalars(result), "config": result.get("config", {})})


def _mlflow_parent(spec: SearchSpec, experiment: Path) -> tuple[Any, str]:
    """The MLflow client and the search's parent run (reused on resume), in an MLflow experiment
    named after the folder whose artifacts stay in the folder too."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(spec, experiment))
    name = Path(experiment).name
    found = client.get_experiment_by_name(name)
    experiment_id = (
        found.experiment_id
        if found is not None
        else client.create_experiment(name, artifact_location=(Path(experiment).resolve() / "mlruns").as_uri())
    )
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.runName = '{PARENT_RUN}'")
    run = runs[0] if runs else client.create_run(experiment_id, run_name=PARENT_RUN)
    return client, run.info.run_id


def tracking_callbacks(spec: SearchSpec, experiment: Path) -> tuple[list[tune.Callback], str | None]:
    """The logger callbacks for ``search.tracking``, and the MLflow parent run's id (or None).
    Tune's automatic loggers are turned off (they would add the warning TensorBoard logger back)."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    callbacks: list[tune.Callback] = [JsonLoggerCallback(), CSVLoggerCallback()]
    if "tensorboard" in spec.search.tracking:
        callbacks.append(ScalarTBXLoggerCallback())
    parent = None
    if "mlflow" in spec.search.tracking:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        _, parent = _mlflow_parent(spec, experiment)
        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=tracking_uri(spec, experiment),
                experiment_name=Path(experiment).name,
                tags={"mlflow.parentRunId": parent},
            )
        )
    return callbacks, parent


def log_search_to_parent(spec: SearchSpec, experiment: Path, parent: str | None, summary: dict[str, Any]) -> None:
    """The front on the parent run: hypervolume, front size, trials, best value per objective, and
    summary.json / the front table as artifacts."""
    if parent is None:
        return
    client, _ = _mlflow_parent(spec, experiment)
    for key in ("hypervolume", "front_size", "trials", *(k for k in summary if k.startswith("best_"))):
        value = summary.get(key)
        if isinstance(value, (int, float)):
            client.log_metric(parent, key, float(value))
    reference = summary.get("reference_config") or {}
    if reference.get("hv_vs_reference") is not None:
        client.log_metric(parent, "hv_vs_reference", float(reference["hv_vs_reference"]))
    for name in ("summary.json", "pareto/front.parquet"):
        path = Path(experiment) / name
        if path.exists():
            client.log_artifact(parent, str(path))
    client.set_terminated(parent)
