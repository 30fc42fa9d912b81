"""Adding a registry entry is enough: the test plugin (tests/registry_plugin.py, loaded through
``XKD_PLUGINS`` in every process) adds a method, a metric, an explainer and a dataset without
touching the package, and each one reaches the config, the CLI, training, the files and a search."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.conftest import OWN_CLUSTER, REPO, TINY_OVERRIDES, ray_head
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


PLUGIN_DISTILL_DRIVER = textwrap.dedent(
    """
    import json, sys
    from xkd_ray.cluster.ray_run import distill_with_ray
    from xkd_ray.config.schema import ExperimentConfig
    from xkd_ray.core.prepared import prepare
    address, overrides, storage = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    config = ExperimentConfig().with_overrides(overrides)
    _, metrics = distill_with_ray(config, prepare(config, progress=False), address=address, storage_path=storage)
    print(json.dumps({"val": metrics["val"], "epochs": [row["epoch"] for row in metrics["history"]]}))
    """
)


@pytest.mark.slow
@OWN_CLUSTER
def test_a_plugin_method_trains_on_a_cluster_started_without_the_plugin(tiny_data, cache_dir, tmp_path):
    """A head started by `ray start` from an environment without ``XKD_PLUGINS`` and without the
    repository (the folder holding ``tests/``) on ``PYTHONPATH``, as a cluster's nodes are; a driver
    that has both runs one Ray Train distill with the plugin's method there. Its worker, started by
    that head's raylet, knows the method and the plugin's metric only through the job's runtime env
    (``xkd_ray.cluster.runtime_env``): both epochs train and the metric is in the validation
    metrics. Before, the raylet's workers lacked the variable and the method failed in the worker.

    The driver runs outside the repository: Ray puts a driver's working folder on its workers'
    ``sys.path``, which would hide a missing plugin folder. The head has ports and a temp folder of
    its own, so it never meets the session's local Ray; it is stopped by signalling its `ray start
    --block` process, which stops what it started (`ray stop` would stop every Ray process on the
    machine, the session's included)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="xkdplug-", dir="/tmp"))
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    auth = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    head_env = {name: value for name, value in os.environ.items()
                if name not in ("XKD_PLUGINS", "PYTHONPATH", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}  # fmt: skip
    head_env.update(auth)
    try:
        with ray_head(head_env, cwd=temp_dir) as (gcs_address, _):
            overrides = {**TINY_OVERRIDES, "explain.cache_dir": cache_dir, "distill.method": PLUGIN_METHOD,
                         "ray.num_workers": 1}  # fmt: skip
            # Beside the session's busy Ray (pytest-xdist), ray.init's one GCS request for the local
            # raylets once ran past Ray's 60 s default on 2 cores, and once the driver's connection
            # to that starved GCS did (it exits after 60 s unanswered): the head's start-up budget for both.
            driver_env = {**head_env, "XKD_PLUGINS": "tests.registry_plugin", "PYTHONPATH": str(REPO),
                          "RAY_gcs_server_request_timeout_seconds": "180",
                          "RAY_gcs_rpc_server_reconnect_timeout_s": "180"}  # fmt: skip
            driver = subprocess.run(
                [sys.executable, "-c", PLUGIN_DISTILL_DRIVER, gcs_address, json.dumps(overrides),
                 str(tmp_path / "ray_train")],
                env=driver_env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert driver.returncode == 0, driver.stderr[-3000:]
    trained = json.loads(driver.stdout.strip().splitlines()[-1])
    assert trained["epochs"] == [0, 1]
    assert 0.0 < trained["val"]["accuracy"] <= 1.0
    assert PLUGIN_METRIC in trained["val"]  # computed in the worker, by the plugin's metric
