"""A student's Ray Train run from the outside: building the trainer, running it, reading its
checkpoint back, and joining (or starting) Ray. The per-worker loop is ``ray_train``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import BackendConfig, Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from xkd_ray.cluster.fault_hooks import (
    POLL_INTERVAL_ENV,
    fault_marker_folder,
)
from xkd_ray.cluster.ray_train import QUICK_POLL_INTERVAL_S, read_checkpoint, worker_loop
from xkd_ray.cluster.runtime_env import job_runtime_env
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.distill import (
    build_student,
    evaluate,
    final_metrics,
)
from xkd_ray.core.models import StudentNet
from xkd_ray.core.prepared import DistillData
from xkd_ray.errors import XKDConfigError, XKDTrainingDiverged


@contextlib.contextmanager
def quick_polling(interval_s: float = QUICK_POLL_INTERVAL_S) -> Iterator[None]:
    """Around ``fit()``: the Ray Train run polls its workers every ``interval_s`` instead of
    Ray's 2 s, unless the user set ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (then theirs holds).

    Ray Train 2.60 moves reports only when its controller polls: each worker's result queue holds
    one report, so a worker's ``ray.train.report`` blocks until the previous one was collected,
    i.e. a run makes at most one report (one epoch) per interval, and its end is noticed one or
    two polls late. At 2 s a 12-epoch student whose epochs take 0.5 s needs 24 s instead of 6
    (measured: 8 empty reports took 26 s at 2 s, 11 s at 0.25 s; the end of the run was seen
    4-5 s after the last report, against 1.2-1.5 s). A poll is one small actor call per worker,
    and one that does not answer in time is awaited again at the next (it takes
    ``RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S``, 10 min, to declare a worker dead), so a short
    interval costs little and changes no failure handling. Ray Train reads the variable when
    ``fit()`` starts the controller and hands it on to the controller and the workers, so it is
    set only for that call."""
    if POLL_INTERVAL_ENV in os.environ:
        yield
        return
    os.environ[POLL_INTERVAL_ENV] = str(interval_s)
    try:
        yield
    finally:
        os.environ.pop(POLL_INTERVAL_ENV, None)


def make_trainer(
    config: ExperimentConfig,
    data_ref: ray.ObjectRef,
    *,
    name: str,
    storage_path: str | Path,
    callbacks: list[Any] | None = None,
    objectives: tuple[str, ...] = (),
    storage_filesystem: Any = None,
) -> DataParallelTrainer:
    """A Ray Train run of the students' ``worker_loop``. ``objectives``: metrics a diverged run
    still reports (as NaN), because Tune checks every report for the search's objectives."""
    extra = {"data_ref": data_ref, "objectives": list(objectives)}
    return build_trainer(
        worker_loop, config, extra, name=name, storage_path=storage_path,
        storage_filesystem=storage_filesystem, callbacks=callbacks,
    )  # fmt: skip


def build_trainer(
    loop: Callable[[dict[str, Any]], None],
    config: ExperimentConfig,
    loop_config: dict[str, Any],
    *,
    name: str,
    storage_path: str | Path,
    storage_filesystem: Any = None,
    callbacks: list[Any] | None = None,
) -> DataParallelTrainer:
    """A Ray Train run of ``loop`` (students' and teacher's alike) over ``config.ray``'s workers;
    ``loop`` gets ``loop_config`` plus ``config`` (as a dict) and ``run_folder``. With
    ``storage_filesystem`` (object storage, ``xkd_ray.pareto.storage``), ``storage_path`` is a path in it.

    Several workers train with DDP (``TorchTrainer``: a gloo / nccl process group). One worker
    needs no process group (``prepare_model`` wraps nothing at world size 1, and the loop's
    collectives are skipped when ``torch.distributed`` is not initialised), so it runs under
    Ray Train's plain ``DataParallelTrainer``: the controller then never imports torch (unpickling
    ``TorchConfig`` does) and the worker skips the process group's set-up and tear-down round
    trips. Checkpoints, restarts (``FailureConfig``) and reports are the same Ray Train run."""
    ray_settings = config.ray
    if storage_filesystem is None:
        storage_path = str(Path(storage_path).resolve())
    else:
        storage_path = str(storage_path)
    run_folder = fault_marker_folder(storage_path, name, on_object_storage=storage_filesystem is not None)
    resources = {"CPU": ray_settings.cpus_per_worker}
    if ray_settings.use_gpu:
        resources["GPU"] = 1
    common: dict[str, Any] = {
        "train_loop_config": {**loop_config, "config": config.to_dict(), "run_folder": run_folder},
        "scaling_config": ScalingConfig(
            num_workers=ray_settings.num_workers, use_gpu=ray_settings.use_gpu, resources_per_worker=resources
        ),
        "run_config": RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=ray_settings.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=ray_settings.max_failures),
            callbacks=callbacks or [],
        ),
    }
    if ray_settings.num_workers == 1:
        return DataParallelTrainer(loop, backend_config=BackendConfig(), **common)
    return TorchTrainer(loop, torch_config=TorchConfig(backend="nccl" if ray_settings.use_gpu else "gloo"), **common)


def student_from_checkpoint(
    config: ExperimentConfig, data: DistillData, checkpoint: Checkpoint
) -> tuple[StudentNet, list[dict[str, Any]]]:
    """The trained student and the per-epoch history (kept in the checkpoint, so it survives
    restarts). A run whose loss became NaN/inf ends with a weights-free checkpoint that says
    so, and raises here like the plain loop does."""
    state = read_checkpoint(checkpoint)
    if state.get("diverged"):
        raise XKDTrainingDiverged(f"Ray Train: the loss became NaN/inf at epoch {state['epoch']}; lower distill.lr")
    student = build_student(config, data.splits)
    student.load_state_dict(state["model"])
    return student.eval(), list(state["history"])


def ensure_ray(address: str | None = None) -> None:
    """Join ``address`` (or a running cluster) or start a local Ray; never start a second one.
    Workers get ``job_runtime_env``: storage settings and plugins, never a credential (Ray logs
    a job's env_vars; a local Ray's workers inherit the driver's environment, a cluster's nodes
    use the AWS SDK's chain)."""
    if ray.is_initialized():
        return
    ray.init(
        address=address,
        ignore_reinit_error=True,
        logging_level="WARNING",
        log_to_driver=False,
        runtime_env=job_runtime_env(),
    )


def distill_with_ray(
    config: ExperimentConfig,
    data: DistillData,
    *,
    address: str | None = None,
    storage_path: str | Path | None = None,
    name: str | None = None,
) -> tuple[StudentNet, dict[str, Any]]:
    """Train one student with Ray Train and evaluate it like the plain loop does.

    Re-running with the same ``name`` and ``storage_path`` resumes from the run's last
    checkpoint (Ray Train restores its own state from storage).
    """
    if config.ray.num_workers < 1:
        raise XKDConfigError("ray.num_workers: must be >= 1 to train with Ray (0 = plain loop)")
    ensure_ray(address)
    storage_path = storage_path or Path(config.explain.cache_dir) / "ray_train"
    name = name or f"distill-{config.distill.method}-{uuid.uuid4().hex[:8]}"
    trainer = make_trainer(config, ray.put(data), name=name, storage_path=storage_path)
    with quick_polling():
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    student, history = student_from_checkpoint(config, data, result.checkpoint)
    metrics = {
        "val": final_metrics(history),
        "test": evaluate(student, data, "test", config),
        "teacher": data.teacher_metrics,
        "history": history,
        "ray": {"name": name, "storage_path": str(storage_path), "last_report": dict(result.metrics or {})},
    }
    return student, metrics
