"""One search trial: the Tune trainable that trains a student, saves it and reports its metrics.

Ray 2.60 runs Ray Train V2, where a ``TorchTrainer`` is not a Tune trainable: a trial is a small
*driver function* (``trial_driver``). With two or more workers it builds its own Ray Train run
(named after the trial id, so a restored search resumes the inner run from its checkpoints) and
forwards the workers' reports to Tune with ``TuneReportCallback``. A trial with one worker
(``search.one_worker_in_driver``, the default) has nothing to shard: its driver runs the same
training loop itself (``ray_train.train_student_loop`` over ``in_driver_session``), with Tune's
checkpoints and Tune's retry from the last one, and Tune reuses the driver process for the next
trial, so such a trial starts no process at all (bench/trial_overhead.py: 6.7 s of fixed cost
per trial down to 0.005 s).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from xkd_ray.cluster.fault_hooks import fault_marker_folder
from xkd_ray.cluster.ray_run import make_trainer, student_from_checkpoint
from xkd_ray.cluster.ray_train import LoopSession, assigned_device, train_student_loop
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.config.space import SearchSpec
from xkd_ray.core.checkpoints import atomic_write_json
from xkd_ray.core.distill import evaluate, final_metrics, save_student
from xkd_ray.core.models import StudentNet
from xkd_ray.core.prepared import DistillData
from xkd_ray.errors import XKDTrainingDiverged
from xkd_ray.pareto.storage import Storage
from xkd_ray.testing.faults import fault_rule, hold_while_armed

DRIVER_CPU = 0.1  # a trial's driver only waits on its Ray Train run; Tune refuses 0
TRIAL_REPORT = "trial_report.json"  # a finished trial's final report, written last into its student folder


def _saved_report(experiment: Path, storage: Storage | None, trial_id: str) -> dict[str, Any] | None:
    """The final report of this trial if its student was already saved (``TRIAL_REPORT``, written
    after everything else), else None. After a SIGKILL, Tune's last saved state can predate a
    trial's end; on ``--resume`` that trial's driver replays this report instead of training
    again. A folder without it (killed while saving) is trained anew and overwritten."""
    relative = f"students/{trial_id}/{TRIAL_REPORT}"
    try:
        if storage is None:
            path = experiment / relative
            return json.loads(path.read_text()) if path.is_file() else None
        return json.loads(storage.read_bytes(relative)) if storage.exists(relative) else None
    except (OSError, ValueError):
        return None


def trains_in_driver(spec: SearchSpec) -> bool:
    """Whether trials train inside their Tune driver (one worker, ``search.one_worker_in_driver``)."""
    return spec.search.workers_per_trial == 1 and spec.search.one_worker_in_driver


def in_driver_session() -> LoopSession:
    """The training loop's session inside a Tune trial: one rank, the trial's GPU if it has one,
    Tune's checkpoint (a retried or resumed trial) and Tune's report."""
    device = assigned_device()

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        tune.report(metrics, checkpoint=None if folder is None else tune.Checkpoint.from_directory(folder))

    return LoopSession(
        world=1,
        rank=0,
        device=device,
        checkpoint=tune.get_checkpoint(),
        report=report,
        prepare_model=lambda model: model.to(device),
        prepare_loader=lambda loader: loader,
    )


def _report_diverged(config: ExperimentConfig, objectives: list[str]) -> None:
    """NaN objectives: the one divergence sentinel (Optuna records the trial as failed, never as a point)."""
    nan = float("nan")
    tune.report({**dict.fromkeys(objectives, nan), "status": "diverged", "experiment_config": config.to_dict()})


def _wait_for_forwarded_reports(timeout_s: float = 60.0) -> None:
    """Wait until Tune has taken every epoch report ``TuneReportCallback`` forwarded, before the
    driver's own final ``tune.report``. In Ray 2.60 both go through the trial's one-slot result
    queue: a forwarded report still in flight when the final one is put deadlocks the trial (its
    main thread blocks putting the forwarded report, its training thread putting the final one;
    seen in a test run, both threads stuck in ``Queue.put``). Two quiet polls 0.1 s apart close
    the window where the main thread has taken a forwarded report but not yet queued it."""
    from ray.train._internal.session import get_session

    session = get_session()
    forwarded = getattr(session, "_inter_actor_queue", None) if session is not None else None
    if session is None:
        return
    deadline, quiet = time.monotonic() + timeout_s, 0
    while quiet < 2 and time.monotonic() < deadline:
        busy = (forwarded is not None and not forwarded.empty()) or not session.result_queue.empty()
        quiet = 0 if busy else quiet + 1
        time.sleep(0.1)


def _train_path(shared: dict[str, Any]) -> str | Path:
    storage: Storage | None = shared.get("storage")
    return Path(shared["experiment"]) / "train" if storage is None else storage.path("train")


def _train_in_driver(
    config: ExperimentConfig, trial_id: str, shared: dict[str, Any], objectives: list[str], data: DistillData
) -> tuple[StudentNet, list[dict[str, Any]]] | None:
    """The training loop in this Tune trial's process; None if it diverged."""
    on_object_storage = shared.get("storage") is not None
    run_folder = fault_marker_folder(_train_path(shared), trial_id, on_object_storage=on_object_storage)
    loop_config = {"config": config.to_dict(), "run_folder": run_folder, "objectives": objectives}
    return train_student_loop({**loop_config, "data_ref": shared["data_ref"]}, in_driver_session())


def _train_with_ray_train(
    config: ExperimentConfig, trial_id: str, shared: dict[str, Any], objectives: list[str], data: DistillData
) -> tuple[StudentNet, list[dict[str, Any]]] | None:
    """A Ray Train run named after the trial (a restored search resumes it from its checkpoints),
    its reports forwarded to Tune; None if it diverged."""
    from xkd_ray.cluster.ray_run import quick_polling

    storage: Storage | None = shared.get("storage")
    trainer = make_trainer(
        config,
        shared["data_ref"],
        name=f"trial-{trial_id}",
        storage_path=_train_path(shared),
        callbacks=[TuneReportCallback()],
        objectives=objectives,
        storage_filesystem=None if storage is None else storage.filesystem,
    )
    with quick_polling():  # Ray Train moves one report per poll: poll every 0.25 s, not every 2 s
        result = trainer.fit()
    try:
        student = student_from_checkpoint(config, data, result.checkpoint)
    except XKDTrainingDiverged:
        student = None
    # Before the driver's own report: Ray 2.60 deadlocks when it meets a forwarded one in flight.
    _wait_for_forwarded_reports()
    return student


def trial_driver(sampled: dict[str, Any], *, shared: dict[str, Any]) -> None:
    """One trial: train a student (in this process, or as a Ray Train run for 2+ workers), save
    it, report its final validation metrics. The final report's ``timings`` stamps the driver's
    phases (bench/trial_overhead.py)."""
    entered = time.time()
    from xkd_ray.cluster.ray_train import process_started_at

    experiment = Path(shared["experiment"])
    spec: SearchSpec = shared["spec"]
    config = spec.config_for(sampled)  # a CLI-default point trains exactly as `xkd distill` would
    objectives = [name for name, _ in spec.search.objective_pairs()]
    if fault_rule("fail_driver", config.to_dict()) is not None:
        raise RuntimeError("injected fault: fail_driver (XKD_FAULTS), so this trial's driver fails on purpose")
    hold_while_armed(config.to_dict())
    trial_id = tune.get_context().get_trial_id()
    storage: Storage | None = shared.get("storage")
    saved = _saved_report(experiment, storage, trial_id)
    if saved is not None:
        tune.report(saved)
        return
    data: DistillData = ray.get(shared["data_ref"])
    fit_called = time.time()
    train = _train_in_driver if trains_in_driver(spec) else _train_with_ray_train
    trained = train(config, trial_id, shared, objectives, data)
    fit_returned = time.time()
    if trained is None:
        _report_diverged(config, objectives)
        return
    student, history = trained
    # Each resume from a checkpoint (after a worker or node died) starts a new start_epoch.
    resumed = len({int(record["start_epoch"]) for record in history}) - 1
    val = final_metrics(history)
    # The test split here, on this trial's worker, not in the search's driver: Tune's control loop
    # never waits on it, and the registry copies it from the student folder if the trial joins the front.
    test_started = time.time()
    test = evaluate(student, data, "test", config, device=assigned_device())
    metrics = {"val": val, "test": test, "teacher": data.teacher_metrics}
    test_seconds = time.time() - test_started
    student_dir = str(experiment / "students" / trial_id) if storage is None else f"students/{trial_id}"
    report = {
        **val,
        "status": "ok",
        "epochs_trained": len({int(record["epoch"]) for record in history}),
        "nodes": {
            "driver": ray.get_runtime_context().get_node_id(),
            "workers": sorted({node for record in history for node in record.get("node_ids", [])}),
        },
        "student_dir": student_dir,
        "resumed_from_checkpoint": resumed,
        "experiment_config": config.to_dict(),
        "timings": {
            "driver_process_started": process_started_at(),
            "driver_entered": entered,
            "fit_called": fit_called,
            "fit_returned": fit_returned,
            "test_seconds": test_seconds,
            "driver_reported": time.time(),
        },
    }
    if storage is None:
        save_student(student_dir, config, student, data, metrics)
        atomic_write_json(Path(student_dir) / TRIAL_REPORT, report)
    else:  # this node's disk is not the search driver's: the student goes to storage, named relative to it
        with tempfile.TemporaryDirectory(prefix="xkd-student-") as local:
            folder = save_student(Path(local) / trial_id, config, student, data, metrics)
            storage.upload(folder, student_dir)
            atomic_write_json(Path(local) / TRIAL_REPORT, report)
            storage.upload(Path(local) / TRIAL_REPORT, student_dir, TRIAL_REPORT)
    tune.report(report)


def build_trainable(shared: dict[str, Any]) -> Any:
    """The Tune trainable: a small driver that waits on its Ray Train run, or, training in its
    driver, a process with one worker's resources."""
    spec: SearchSpec = shared["spec"]
    resources: dict[str, float] = {"cpu": DRIVER_CPU}
    if trains_in_driver(spec):
        resources = {"cpu": spec.search.cpus_per_worker, "gpu": 1 if spec.base.ray.use_gpu else 0}
    return tune.with_resources(tune.with_parameters(trial_driver, shared=shared), resources)
