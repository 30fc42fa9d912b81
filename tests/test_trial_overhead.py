"""A search trial's fixed cost (bench/trial_overhead.py): one worker trains without a process
group, trial drivers poll their run quickly, and each run attempt's first report carries the
timings of the worker's start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.train import BackendConfig, UserCallback
from ray.train.torch import TorchTrainer

from xkd_ray.cluster.fault_hooks import POLL_INTERVAL_ENV
from xkd_ray.cluster.ray_run import make_trainer, quick_polling
from xkd_ray.cluster.ray_train import QUICK_POLL_INTERVAL_S, process_started_at

IMPORTED = time.time()
WORKER_PHASES = (
    "worker_process_started",
    "worker_imports_done",
    "worker_loop_entered",
    "data_ready",
    "first_epoch_started",
    "first_epoch_trained",
    "first_evaluated",
    "first_report",
)


def test_one_worker_trains_without_a_process_group_and_several_with_ddp(tiny_config, tmp_path):
    one = make_trainer(tiny_config.with_overrides({"ray.num_workers": 1}), None, name="one", storage_path=tmp_path)
    assert not isinstance(one, TorchTrainer) and type(one.backend_config) is BackendConfig
    two = make_trainer(tiny_config.with_overrides({"ray.num_workers": 2}), None, name="two", storage_path=tmp_path)
    assert isinstance(two, TorchTrainer) and two.backend_config.backend == "gloo"


def test_the_controller_of_a_one_worker_run_does_not_import_torch(tiny_config, tmp_path):
    """What Ray Train's controller unpickles of a run (its context: configs, backend, loop
    config) pulls no torch in for one worker; ``TorchConfig`` does, for several."""
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print('torch' in sys.modules)"
    for workers, imports_torch in ((1, "False"), (2, "True")):
        config = tiny_config.with_overrides({"ray.num_workers": workers})
        context = make_trainer(config, None, name=f"w{workers}", storage_path=tmp_path).train_run_context
        out = subprocess.run(
            [sys.executable, "-c", code], input=ray.cloudpickle.dumps(context), capture_output=True, check=True
        )
        assert out.stdout.decode().strip() == imports_torch


def test_quick_polling_sets_the_interval_for_one_fit_unless_the_user_did(monkeypatch):
    monkeypatch.setenv(POLL_INTERVAL_ENV, "unset")  # recorded first, so the test leaves the variable as it was
    monkeypatch.delenv(POLL_INTERVAL_ENV)
    with quick_polling():
        assert float(os.environ[POLL_INTERVAL_ENV]) == QUICK_POLL_INTERVAL_S
    assert POLL_INTERVAL_ENV not in os.environ
    monkeypatch.setenv(POLL_INTERVAL_ENV, "3")
    with quick_polling():
        assert os.environ[POLL_INTERVAL_ENV] == "3"
    assert os.environ[POLL_INTERVAL_ENV] == "3"


def test_process_start_time():
    started = process_started_at()
    if started is None:
        pytest.skip("no /proc on this platform")
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    # This process started after the machine booted and before it imported this module.
    assert time.time() - uptime - 1 <= started <= IMPORTED + 0.05


class WriteReports(UserCallback):
    """Appends each report's rank-0 metrics to a JSON-lines file (callbacks run in the controller)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(metrics[0], default=str) + "\n")


@pytest.mark.slow
def test_the_first_report_of_a_run_carries_the_worker_start_up_timings(ray_local, tiny_config, tiny_data, tmp_path):
    reports = tmp_path / "reports.jsonl"
    config = tiny_config.with_overrides({"ray.num_workers": 1, "ray.cpus_per_worker": 0.9})
    called = time.time()
    trainer = make_trainer(
        config, ray.put(tiny_data), name="timed", storage_path=tmp_path, callbacks=[WriteReports(str(reports))]
    )
    trainer.fit()
    first, *rest = [json.loads(line) for line in reports.read_text().splitlines()]
    assert len(rest) == config.distill.epochs - 1 and not any("timings" in report for report in rest)
    stamps = [first["timings"][phase] for phase in WORKER_PHASES]
    assert called - 0.05 <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= time.time()
    assert first["workers"] == 1 and first["epoch"] == 0
