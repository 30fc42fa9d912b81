"""Fault injection for the Ray Train loops, kept out of the product loop's module.

The loops call ``maybe_kill_worker`` once per epoch; it does nothing unless a rule of
``xkd_ray.testing.faults`` (armed by a test through ``XKD_FAULTS``) names that run and epoch.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import ray

from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.testing.faults import fault_rule

# Ray Train's controller health-check interval (its env variable and default): the kill hook waits a few.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_POLL_INTERVAL_S = 2.0


FAULT_MARKER = ".fault-injected"


def fault_marker_folder(storage_path: str | Path, name: str, on_object_storage: bool) -> str:
    """Where ``maybe_kill_worker`` leaves its once-per-run marker: the run's folder, or on object
    storage (no local folder) a temporary folder every local worker of the run sees."""
    if on_object_storage:
        return str(Path(tempfile.gettempdir()) / "xkd-runs" / name)
    return str(Path(storage_path) / name)


def maybe_kill_worker(
    config: ExperimentConfig, epoch: int, run_folder: str, stage: str | None = None, last_rank: bool | None = None
) -> None:
    """Test hook (``xkd_ray.testing.faults``): the last worker kills its own process (SIGKILL, a real
    crash) at the rule's epoch, once per run (a marker file in the run's folder says it happened).
    ``stage``: a run other than a student's (the teacher's) fires only rules keyed on its
    ``stage.name``, so a student's rule never kills a teacher worker. ``last_rank``: whether this
    process is the last rank (asked of Ray Train's context when not given).

    It first waits until the previous epoch's report and checkpoint have been collected: the
    fault under test is "a worker dies after a checkpoint", and a report still in flight when its
    worker dies is lost by design. In a Ray Train run that is when the controller's snapshot in
    the run's folder names that checkpoint; elsewhere (a trial trained in its Tune driver, a run on
    object storage) it waits three of the controller's health-check intervals (at least three of
    Ray's default 2 s, also under ``quick_polling``: the same margin on a loaded machine)."""
    keys = config.to_dict() if stage is None else {**config.to_dict(), "stage": {"name": stage}}
    rule = fault_rule("kill_worker", keys)
    if rule is None or epoch != rule.get("epoch"):
        return
    if stage is not None and rule.get("when", {}).get("stage.name") != stage:
        return
    marker = Path(run_folder) / FAULT_MARKER
    if last_rank is None:
        context = ray.train.get_context()
        last_rank = context.get_world_rank() == context.get_world_size() - 1
    if marker.exists() or not last_rank:
        return
    interval = float(os.environ.get(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL_S))
    deadline = time.monotonic() + 3 * max(interval, DEFAULT_POLL_INTERVAL_S)
    while time.monotonic() < deadline and not _checkpoint_registered(run_folder, epoch - 1):
        time.sleep(0.1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)


CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's registered checkpoints, per run


def _checkpoint_registered(run_folder: str, epoch: int) -> bool:
    """Whether Ray Train's controller has registered this run's checkpoint of ``epoch`` (its
    snapshot file in the run's folder; none for a run that is not a local Ray Train run)."""
    try:
        snapshot = json.loads((Path(run_folder) / CHECKPOINT_SNAPSHOT).read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"]) >= epoch
    except (OSError, ValueError, KeyError, TypeError):  # no snapshot (yet), or one being written
        return False
