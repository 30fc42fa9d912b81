"""A head started by `ray start`, as on a cluster, and what its users do with it: submit the search
as a Ray job with token authentication and follow it in `ray job logs`, and connect a driver whose
plugins the head has never heard of. One head serves both (each head is a GCS, a raylet, a
dashboard and its agents: ~15 s of the suite's two cores to start, and work beside it to stop)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import FRESH_TEACHER, OWN_CLUSTER, RAY_BIN, REPO, TIMING, TINY_OVERRIDES, ray_head, smoke_space
from tests.registry_plugin import PLUGIN_METHOD, PLUGIN_METRIC
from xkd_ray.core.progress import INTERVAL_ENV
from xkd_ray.pareto.front import read_trials

pytestmark = [pytest.mark.slow, OWN_CLUSTER]

# Run in a subprocess so that its environment (plugins, PYTHONPATH) is the driver's alone.
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


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head with token authentication (``RAY_AUTH_MODE=token``, as cluster/*.yaml starts Ray) and
    its dashboard's job API, started from an environment without ``XKD_PLUGINS`` and without the
    repository on ``PYTHONPATH``, from a folder outside it, as a cluster's nodes are. Its token is
    the test's own file (`ray start` makes none), as `ray get-auth-token --generate` writes
    ~/.ray/auth_token: read by the head, `ray job` and every driver given ``RAY_AUTH_TOKEN_PATH``."""
    folder = Path(tempfile.mkdtemp(prefix="xkdtok-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = folder / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {name: value for name, value in os.environ.items()
           if name not in ("XKD_PLUGINS", "PYTHONPATH", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}  # fmt: skip
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    with ray_head(env, dashboard=True, cwd=folder) as (gcs_address, dashboard_url):
        yield {"gcs": gcs_address, "dashboard": dashboard_url, "env": env, "token": token}


def test_the_search_runs_as_a_ray_job_with_token_auth_and_reports_in_its_logs(token_head, tmp_path):
    """The user's path: the script submitted with `ray job submit`, a fresh cache so that the job
    trains its teacher with Ray Train and explains it on Ray actors, the registry found afterwards.
    What a person following `ray job logs` sees: the teacher's epochs and explanation batches
    (relayed to the job's driver) and one line per finished trial, as plain lines with no bar codes.
    The head really demands the token: its jobs API answers 401 without it, 403 with a wrong one,
    and lists the job with it."""
    from ray.job_submission import JobSubmissionClient

    space = smoke_space(tmp_path, str(tmp_path / "cache"), trials=2)
    raw = yaml.safe_load(space.read_text())
    raw["base"]["data"]["max_train_samples"] = FRESH_TEACHER["data.max_train_samples"]
    space.write_text(yaml.safe_dump(raw))
    experiment = tmp_path / "experiment"
    address, env = token_head["dashboard"], token_head["env"]
    job_id = f"xkd-search-{secrets.token_hex(4)}"
    runtime_env = json.dumps({"excludes": [".venv", ".xkd_cache", "runs", ".git"], "env_vars": {INTERVAL_ENV: "0"}})
    for _ in range(20):  # the head's job agent comes up a little after the dashboard answers
        submitted = subprocess.run(
            [RAY_BIN, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(REPO),
             "--runtime-env-json", runtime_env, "--",
             sys.executable, "xkd_ray/search.py", "--space", str(space), "--out", str(experiment),
             "--address", "auto", "--no-live"],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        shown = submitted.stdout[-3000:] + submitted.stderr[-3000:]
        if "No available agent" not in shown:
            break
        job_id = f"xkd-search-{secrets.token_hex(4)}"  # a refused submission's id stays taken
    assert submitted.returncode == 0 and "succeeded" in shown.lower(), shown
    # The job's own output, as the dashboard's jobs API serves it (the `ray job logs` CLI adds a coloured header).
    logs = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token_head['token']}"}).get_job_logs(job_id)

    epochs = TINY_OVERRIDES["teacher.epochs"]
    lines = [line for line in logs.splitlines() if line.startswith("teacher epochs (Ray Train):")]
    assert lines and lines[-1].startswith(f"teacher epochs (Ray Train): {epochs}/{epochs} (100%)"), logs[-3000:]
    explained = rf"^teacher gradcam on 1 Ray workers \(train, val, test\): (\d+)/\1 \(100%\) {TIMING}"
    assert re.search(explained, logs, re.MULTILINE), logs[-3000:]
    finished = re.findall(r"trial \S+ ok after (\d+) epoch\(s\)", logs)
    assert finished == ["2", "2"], logs[-3000:]
    assert "\x1b[" not in logs

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy

    def jobs_api(authorization: str | None) -> tuple[int, str]:
        headers = {} if authorization is None else {"Authorization": authorization}
        try:
            with direct.open(urllib.request.Request(f"{address}/api/jobs/", headers=headers), timeout=60) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read().decode()

    assert jobs_api(None)[0] == 401
    assert jobs_api(f"Bearer {secrets.token_hex(32)}")[0] == 403
    status, body = jobs_api(f"Bearer {token_head['token']}")
    assert status == 200, body
    assert "SUCCEEDED" in [job["status"] for job in json.loads(body) if job["submission_id"] == job_id]
    assert len(read_trials(experiment)) == 2
    assert (experiment / "pareto" / "front.parquet").exists()
    assert (experiment / "pareto" / "front.png").exists()


def test_a_plugin_method_trains_on_a_head_started_without_the_plugin(token_head, cache_dir, tmp_path):
    """A driver that has ``XKD_PLUGINS`` and the repository (the folder holding ``tests/``) on
    ``PYTHONPATH`` runs one Ray Train distill with the plugin's method on that head. Its worker,
    started by the head's raylet, knows the method and the plugin's metric only through the job's
    runtime env (``xkd_ray.cluster.runtime_env``): both epochs train and the metric is in the
    validation metrics. Before, the raylet's workers lacked the variable and the method failed in
    the worker. The driver runs outside the repository: Ray puts a driver's working folder on its
    workers' ``sys.path``, which would hide a missing plugin folder."""
    overrides = {**TINY_OVERRIDES, "explain.cache_dir": cache_dir, "distill.method": PLUGIN_METHOD,
                 "ray.num_workers": 1}  # fmt: skip
    # Beside the session's busy Ray (pytest-xdist), ray.init's one GCS request for the local raylets
    # once ran past Ray's 60 s default on 2 cores, and once the driver's connection to that starved
    # GCS did (it exits after 60 s unanswered): the head's start-up budget for both.
    driver_env = {**token_head["env"], "XKD_PLUGINS": "tests.registry_plugin", "PYTHONPATH": str(REPO),
                  "RAY_gcs_server_request_timeout_seconds": "180",
                  "RAY_gcs_rpc_server_reconnect_timeout_s": "180"}  # fmt: skip
    driver = subprocess.run(
        [sys.executable, "-c", PLUGIN_DISTILL_DRIVER, token_head["gcs"], json.dumps(overrides),
         str(tmp_path / "ray_train")],
        env=driver_env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert driver.returncode == 0, driver.stderr[-3000:]
    trained = json.loads(driver.stdout.strip().splitlines()[-1])
    assert trained["epochs"] == [0, 1]
    assert 0.0 < trained["val"]["accuracy"] <= 1.0
    assert PLUGIN_METRIC in trained["val"]  # computed in the worker, by the plugin's metric
