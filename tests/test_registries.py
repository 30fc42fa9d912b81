"""Adding a registry entry is enough: the test plugin (tests/registry_plugin.py, loaded through
``XKD_PLUGINS`` in every process) adds a method, a metric, an explainer and a dataset without
touching the package, and each one reaches the config, the CLI, training, the files and a search."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SMOKE_SEARCH, TINY_OVERRIDES
from tests.registry_plugin import PLUGIN_DATASET, PLUGIN_EXPLAINER, PLUGIN_METHOD, PLUGIN_METRIC
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.errors import XKDConfigError
from xkd_ray.ui.cli import build_parser, main


def _choices(command: str, option: str) -> list[str]:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    action = next(a for a in subparsers.choices[command]._actions if option in a.option_strings)
    return list(action.choices)


def test_new_entries_are_cli_and_config_choices():
    assert PLUGIN_METHOD in _choices("distill", "--method")
    assert PLUGIN_DATASET in _choices("distill", "--dataset")
    config = ExperimentConfig().with_overrides(
        {"distill.method": PLUGIN_METHOD, "explain.explainer": PLUGIN_EXPLAINER, "data.dataset": PLUGIN_DATASET}
    )
    assert (config.distill.method, config.explain.explainer) == (PLUGIN_METHOD, PLUGIN_EXPLAINER)
    with pytest.raises(XKDConfigError, match=r"distill\.method"):
        ExperimentConfig().with_overrides({"distill.method": "not_registered"})


@pytest.mark.slow  # a plugin distil end to end in a subprocess: the full suite runs it, make test-fast does not
def test_new_method_metric_explainer_and_dataset_train_and_reach_metrics_json(cache_dir, tmp_path):
    """One CLI run using all four new entries: the method's loss terms are the ones it declares,
    the new explainer's maps are cached and distilled, the new metric is in metrics.json."""
    out = tmp_path / "student"
    sets = {**TINY_OVERRIDES, "explain.cache_dir": cache_dir, "explain.explainer": PLUGIN_EXPLAINER}
    argv = ["distill", "--method", PLUGIN_METHOD, "--dataset", PLUGIN_DATASET, "--out", str(out)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    record = json.loads((out / "config.json").read_text())
    assert record["experiment"]["data"]["dataset"] == PLUGIN_DATASET
    assert record["architecture"]["ae_depth"] is not None  # the method declared a head
    for split in ("val", "test"):
        assert 0.0 < metrics[split][PLUGIN_METRIC] < 1.0
    last_epoch = metrics["history"][-1]
    assert "train_explanation" in last_epoch and "train_kd" not in last_epoch


@pytest.mark.slow
@SMOKE_SEARCH
def test_new_method_and_metric_reach_the_search_registry(smoke_experiment):
    """The smoke search (tests/test_search.py) tried the plugin method first, on Ray workers that
    imported the plugin themselves; its row and the new metric's column are in trials.parquet."""
    from xkd_ray.pareto.front import list_pareto_students, read_trials

    experiment = smoke_experiment.experiment
    rows = read_trials(experiment)
    plugin_rows = [r for r in rows if r["method"] == PLUGIN_METHOD]
    assert plugin_rows and plugin_rows[0]["status"] == "ok"
    assert all(r[f"val_{PLUGIN_METRIC}"] is not None for r in rows if r["status"] == "ok")
    assert f"test_{PLUGIN_METRIC}" in list_pareto_students(experiment).column_names
