"""``search.tracking``: a smoke search's MLflow store (SQLite in the experiment folder) read back,
and no warning from Tune's loggers."""

from __future__ import annotations

from tests.conftest import smoke_space


def test_mlflow_store_has_one_run_per_trial_under_a_parent_with_the_front(ray_local, cache_dir, tmp_path, capfd):
    import mlflow

    from xkd_ray.cluster.ray_search import run_search
    from xkd_ray.config.space import load_search_space

    path = smoke_space(tmp_path, cache_dir, trials=2, tracking=["mlflow", "tensorboard"])
    spec = load_search_space(path)
    experiment = tmp_path / "experiment"
    summary = run_search(spec, experiment, live=False)

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
    output = capfd.readouterr()
    assert "invalid value" not in output.out + output.err
