"""``search.tracking``: the smoke search's MLflow store (SQLite in the experiment folder) read
back, its TensorBoard event files, and no warning from Tune's loggers. The smoke search
(``smoke_experiment``, shared with test_search and test_registries) runs with both trackers on."""

from __future__ import annotations

from tests.conftest import SMOKE_SEARCH


@SMOKE_SEARCH
def test_mlflow_store_has_one_run_per_trial_under_a_parent_with_the_front(smoke_experiment):
    import mlflow

    experiment, summary, spec = smoke_experiment.experiment, smoke_experiment.summary, smoke_experiment.spec
    assert (experiment / "mlflow.db").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{experiment / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment.name)
    runs = client.search_runs([found.experiment_id])
    parents = [run for run in runs if run.info.run_name == "search"]
    trials = [run for run in runs if run.info.run_name != "search"]
    assert len(parents) == 1 and len(trials) == spec.search.trials == summary["trials"]
    parent = parents[0]
    assert parent.data.metrics["hypervolume"] == summary["hypervolume"] > 0
    assert parent.data.metrics["front_size"] == summary["front_size"]
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "distill.method" in run.data.params and "accuracy" in run.data.metrics
    # TensorBoard event files per trial, and no warning from Tune's loggers.
    assert list((experiment / "tune").glob("*/events.out.tfevents.*"))
    assert not [message for message in smoke_experiment.tune_warnings if "invalid value" in message]
