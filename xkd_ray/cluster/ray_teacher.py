"""The teacher on the cluster: its training as a Ray Train run, its explanations as a Ray job.

``prepare`` (xkd_ray/core/prepared.py) does both in the calling process; ``prepare_on_workers`` gives
the same ``DistillData`` but trains the teacher (only if it is not cached) with DDP over Ray Train
workers and computes the explanation caches (only the splits not cached) on Ray actors, so the
head node's driver only loads the data, dispatches, and writes the files every later run reads.

* Training: ``teacher_worker_loop`` is ``teacher.train_teacher_epoch`` (the plain loop's math)
  under DDP, with a ``DistributedSampler``, bf16 autocast on GPUs (``ray_train._amp_dtype``, the
  students' rule), a checkpoint per epoch and Ray Train's restart from the last one when a worker
  dies (``FailureConfig``). The result goes into the same cache folder, under the same teacher id,
  as the plain loop's (``teacher.save_teacher``), with the worker count and the Ray node ids of
  the workers in its config.json. On CPU the teacher's BatchNorm uses per-shard statistics (DDP
  broadcasts rank 0's running stats each step); on GPUs it is converted to SyncBatchNorm.
* Explanations: Ray actors over batches (``ray.util.ActorPool``; each actor loads the teacher
  once), not Ray Data ``map_batches``. Measured (IG, 32 steps, digits train split, 1,168 16x16
  images, width-8 teacher, 2-core machine shared with other jobs, load ~10): actors 9.2 s on 1
  worker / 18.1 s on 2, Ray Data's actor pool of 2 33.2 s (batch 128) / 46.9 s (batch 306): the
  dataset's start-up and streaming executor cost more than a small node has to spare, and actors
  return batches in order without a sort. (2 workers beat 1 only where there are idle cores.)
  Maps are computed in float32 (no autocast), batch by batch with ``explain.explain_batch``: each
  map depends only on its own image, so they equal the single-process ones up to float rounding.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from xkd_ray.cluster.fault_hooks import maybe_kill_worker
from xkd_ray.cluster.ray_run import build_trainer, quick_polling
from xkd_ray.cluster.ray_train import _amp_dtype, _set_rng_state, training_state, worker_node_ids
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.models import build_teacher
from xkd_ray.core.progress import track
from xkd_ray.core.teacher import (
    Teacher,
    make_teacher_optimizer,
    save_teacher,
    split_accuracies,
    teacher_architecture,
    teacher_id,
    teacher_input,
    train_teacher_epoch,
)
from xkd_ray.data.splits import Splits
from xkd_ray.errors import XKDConfigError

TEACHER_CHECKPOINT_FILE = "teacher.pt"
# Fault rules (xkd_ray.testing.faults) fire in a teacher run only when their ``when`` names this stage, so
# a rule written for students never kills a teacher run and vice versa:
#   {"fault": "kill_worker", "epoch": 1, "when": {"stage.name": "teacher"}}


# ----------------------------------------------------------------------------- progress relay


@ray.remote(num_cpus=0)
class _ProgressBox:
    """Where rank 0 drops (units, fields) as it goes; the driver drains it into ``track``.

    Workers' stdout does not reach the driver (``ensure_ray`` starts Ray with
    ``log_to_driver=False``) and Ray Train's callbacks run in its controller actor, so an actor
    is the one place both sides can reach, on any node. Zero CPUs: it must never wait for the
    workers' CPUs to be freed."""

    def __init__(self) -> None:
        self.events: list[tuple[int, dict[str, Any]]] = []

    def push(self, units: int, fields: dict[str, Any]) -> None:
        self.events.append((units, fields))

    def drain(self) -> list[tuple[int, dict[str, Any]]]:
        events, self.events = self.events, []
        return events


@contextlib.contextmanager
def _relayed_progress(box: ray.actor.ActorHandle, description: str, total: int, enabled: bool) -> Iterator[None]:
    """Show ``box``'s events through ``track`` from a background thread while the block runs
    (``fit()`` blocks the calling thread)."""
    stop = threading.Event()

    def relay(bar: track) -> None:
        while True:
            stopping = stop.wait(0.5)
            for units, fields in ray.get(box.drain.remote()):
                bar.advance(units, **fields)
            if stopping:
                return

    with track(description, total, enabled) as bar:
        thread = threading.Thread(target=relay, args=(bar,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)


# ----------------------------------------------------------------------------- training


def _world() -> tuple[int, int]:
    context = ray.train.get_context()
    return context.get_world_size(), context.get_world_rank()


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _read_state(checkpoint: Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / TEACHER_CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _report(report: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Report an epoch; rank 0 (the only one passing ``state``) attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if state is not None:
            torch.save(state, Path(directory) / TEACHER_CHECKPOINT_FILE)
            checkpoint = Checkpoint.from_directory(directory)
        ray.train.report(report, checkpoint=checkpoint)


def teacher_worker_loop(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: resume from the last checkpoint, train the teacher one
    epoch at a time with DDP, checkpoint every epoch; the last checkpoint also holds the val/test
    accuracies (measured on rank 0, so the driver never runs the model)."""
    config = ExperimentConfig.from_dict(loop_config["config"])
    splits: Splits = ray.get(loop_config["splits_ref"])
    box = loop_config["progress"]
    world, rank = _world()
    device = ray.train.torch.get_device()
    settings = config.teacher
    if config.ray.threads_per_worker:
        torch.set_num_threads(config.ray.threads_per_worker)
    torch.manual_seed(settings.seed)
    model: nn.Module = build_teacher(**teacher_architecture(config, splits))
    if device.type == "cuda" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state_dict keys
    optimizer, scheduler = make_teacher_optimizer(config, model)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] | None = None
    if checkpoint is not None:
        state = _read_state(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
    node_ids = worker_node_ids()
    model = ray.train.torch.prepare_model(model)
    dataset = TensorDataset(splits.train.images, splits.train.labels)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=settings.seed)
    loader = DataLoader(dataset, batch_size=max(1, settings.batch_size // world), sampler=sampler)
    amp_dtype = _amp_dtype(config, device)
    if start_epoch >= settings.epochs and state is not None:
        # A finished run restored from storage (its driver died before saving the teacher): hand
        # the final state back unchanged.
        _report({"epoch": state["epoch"], "restored": True}, state if rank == 0 else None)
        return
    for epoch in range(start_epoch, settings.epochs):
        maybe_kill_worker(config, epoch, loop_config["run_folder"], stage="teacher")
        sampler.set_epoch(epoch)
        loss_sum, count = train_teacher_epoch(
            model, loader, optimizer, device=device, amp_dtype=amp_dtype, inputs=teacher_input(config, splits)
        )
        scheduler.step()
        totals = torch.stack([loss_sum.float(), torch.tensor(float(count), device=device)])
        if _distributed():
            dist.all_reduce(totals)
        record = {
            "epoch": epoch,
            "loss": float(totals[0] / totals[1]),
            "start_epoch": start_epoch,
            "workers": world,
            "node_ids": node_ids,
            "amp": None if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
            "wall_time": time.time(),
        }
        history.append(record)
        epoch_state = None
        if rank == 0:
            bare = model.module if hasattr(model, "module") else model
            epoch_state = training_state(bare, optimizer, scheduler, epoch, history)
            if epoch == settings.epochs - 1:
                epoch_state["metrics"] = split_accuracies(
                    bare.eval(), splits, ("val", "test"), teacher_input(config, splits)
                )
            box.push.remote(1, {"loss": record["loss"]})
        _report({key: value for key, value in record.items() if key != "node_ids"}, epoch_state)


def train_teacher_with_ray(
    config: ExperimentConfig,
    splits: Splits,
    *,
    workers: int,
    use_gpu: bool = False,
    progress: bool = True,
    storage_path: str | Path | None = None,
    storage_filesystem: Any = None,
) -> Teacher:
    """Train the teacher as a Ray Train run over ``workers`` workers and save it into the teacher
    cache (``teacher.teacher_directory``), where ``load_or_train_teacher`` finds it.

    The run is named after the teacher id, under ``storage_path`` (default
    ``<explain.cache_dir>/ray_train``): a driver that dies mid-run and is started again resumes
    the same run from its last checkpoint. Ray must be initialised (``ensure_ray``)."""
    if workers < 1:
        raise XKDConfigError(f"--workers: got {workers}; Ray Train needs >= 1 worker (0 = the plain loop)")
    config = config.with_overrides({"ray.num_workers": workers, "ray.use_gpu": use_gpu})
    name = f"teacher-{teacher_id(config, splits)}"
    storage = storage_path or Path(config.explain.cache_dir) / "ray_train"
    box = _ProgressBox.remote()
    try:
        trainer = build_trainer(
            teacher_worker_loop, config, {"splits_ref": ray.put(splits), "progress": box},
            name=name, storage_path=storage, storage_filesystem=storage_filesystem,
        )  # fmt: skip
        with quick_polling(), _relayed_progress(box, "teacher epochs (Ray Train)", config.teacher.epochs, progress):
            result = trainer.fit()
    finally:
        ray.kill(box)
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    state = _read_state(result.checkpoint)
    model = build_teacher(**teacher_architecture(config, splits))
    model.load_state_dict(state["model"])
    history = list(state["history"])
    training = {
        "backend": "ray_train",
        "workers": workers,
        "use_gpu": use_gpu,
        "amp": history[-1]["amp"],
        "node_ids": sorted({node for record in history for node in record["node_ids"]}),
        "worker_node_ids": history[-1]["node_ids"],  # by rank, the attempt that finished
        "resumed_from_checkpoint": any(record["start_epoch"] > 0 for record in history),
        "run": f"{storage}/{name}" if storage_filesystem is not None else str(Path(storage).resolve() / name),
        "history": [{k: v for k, v in record.items() if k != "node_ids"} for record in history],
    }
    return save_teacher(config, splits, model, training=training, metrics=dict(state["metrics"]))


# ----------------------------------------------------------------------------- explanations
