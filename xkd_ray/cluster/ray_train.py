"""Ray Train: one student's training sharded over DDP workers (gloo on CPU, nccl on GPU).

The per-worker loop is the core loop (``distill.train_one_epoch`` / ``distill.split_metrics``)
plus what distribution needs: a ``DistributedSampler`` whose global order does not
depend on the worker count, per-epoch checkpoints with the full training state, and
validation metrics computed on the whole split (each worker explains a shard, then all
shards are gathered) so the reported numbers do not depend on the worker count either.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from xkd_ray.cluster.fault_hooks import (
    maybe_kill_worker,
)
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.augment import AugmentCollate
from xkd_ray.core.distill import (
    StudentPredictions,
    build_student,
    distill_dataset,
    make_optimizer,
    split_metrics,
    student_predictions,
    train_one_epoch,
)
from xkd_ray.core.faithfulness import faithfulness_subset
from xkd_ray.core.models import StudentNet
from xkd_ray.core.prepared import DistillData
from xkd_ray.core.stream_run import StreamData, stream_loader
from xkd_ray.data.streaming import split_images

CHECKPOINT_FILE = "state.pt"
# Ray Train's controller collects the workers' reports, and notices that a run has ended, only
# when it polls them: every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S seconds (Ray's default: 2).
QUICK_POLL_INTERVAL_S = 0.25
# When this module finished importing: in a Ray Train worker, that is when the train function was
# unpickled, i.e. the end of the worker's torch / xkd_ray imports (``worker_loop``'s timings).
_IMPORTED_AT = time.time()


def process_started_at() -> float | None:
    """Wall-clock time this process was started (Linux ``/proc``; None elsewhere): the start of
    a trial's worker, for ``worker_loop``'s timings. ``/proc/uptime`` has 10 ms resolution."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
    }


def training_state(
    model: torch.nn.Module, optimizer: Any, scheduler: Any, epoch: int, history: list[dict[str, Any]]
) -> dict[str, Any]:
    """What a checkpoint holds to resume a run exactly (students' and teacher's runs alike): weights,
    optimizer, schedule, RNG state and the per-epoch history."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng": _rng_state(),
        "history": history,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, 624, 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))


def _amp_dtype(config: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it (fp16 otherwise would need a grad scaler); off on CPU."""
    if device.type != "cuda" or not config.ray.amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def _gather_evaluation(
    student: StudentNet,
    split_name: str,
    data: DistillData,
    config: ExperimentConfig,
    device: torch.device,
    diagnostics: bool,
) -> dict[str, float]:
    """Each rank explains a contiguous shard; shards are gathered in rank order and the metrics
    computed once on the whole split, identically on every rank."""
    split = data.splits.split(split_name)
    teacher_predictions = data.teacher_outputs[split_name].predictions
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    bounds = np.linspace(0, len(split), world + 1).astype(int)
    shard = slice(int(bounds[rank]), int(bounds[rank + 1]))
    # Diagnostics cover the split's faithfulness subset (sorted indices): this shard's part of it,
    # gathered in rank order, so the whole subset in order.
    subset = faithfulness_subset(split.labels, config.faithfulness.images, config.faithfulness.seed)
    ours = subset[(subset >= shard.start) & (subset < shard.stop)]
    mine = student_predictions(
        student,
        split_images(split, shard),
        teacher_predictions[shard],
        config,
        device=device,
        diagnostics=ours - shard.start if diagnostics else None,
        ids=ours,
        split=split_name,
    )
    gathered: list[Any] = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    first = gathered[0]
    return split_metrics(
        data,
        split_name,
        config,
        StudentPredictions(
            logits=torch.cat([g.logits for g in gathered]),
            head_maps=None if first.head_maps is None else torch.cat([g.head_maps for g in gathered]),
            posthoc_maps=torch.cat([g.posthoc_maps for g in gathered]),
            diagnostics=None
            if not diagnostics
            else {
                key: torch.cat([g.diagnostics[key] for g in gathered if g.diagnostics])
                for key in next((g.diagnostics for g in gathered if g.diagnostics), {})
            },
            cost=first.cost,
        ),
    )


def assigned_device() -> torch.device:
    """The GPU Ray assigned this task or actor, else the CPU."""
    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")


def worker_node_ids() -> list[str]:
    """The Ray node of every rank, in rank order: where this attempt trains (trials.parquet's ``nodes``)."""
    own = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized():
        return [own]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return [str(node) for node in gathered]


@dataclass
class LoopSession:
    """Where a student's training loop runs, and the few calls that differ there: a rank of a Ray
    Train run (``ray_train_session``), or a Tune trial's own process when the trial has one
    worker (``ray_trial.in_driver_session``: no Ray Train run to start). The loop is the same."""

    world: int
    rank: int
    device: torch.device
    checkpoint: Checkpoint | None  # the attempt's starting point (after a crash or a resume)
    report: Callable[[dict[str, Any], str | None], None]  # (metrics, checkpoint folder or None)
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module]
    prepare_loader: Callable[[DataLoader], DataLoader]


def ray_train_session(find_unused_parameters: bool) -> LoopSession:
    """This Ray Train worker's rank, device, checkpoint and reporting (DDP wrapping when world > 1)."""
    context = ray.train.get_context()

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        ray.train.report(metrics, checkpoint=None if folder is None else Checkpoint.from_directory(folder))

    return LoopSession(
        world=context.get_world_size(),
        rank=context.get_world_rank(),
        device=ray.train.torch.get_device(),
        checkpoint=ray.train.get_checkpoint(),
        report=report,
        prepare_model=lambda model: ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters}
        ),
        prepare_loader=lambda loader: ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False),
    )


def _any_rank_diverged(loss: float, device: torch.device) -> bool:
    """Each rank sees only its shard's loss; all ranks must agree to stop, or DDP deadlocks."""
    flag = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _report_divergence(
    session: LoopSession, record: dict[str, Any], epoch: int, history: list[dict[str, Any]], objectives: list[str]
) -> None:
    """End a diverged run with a weights-free checkpoint that says so: Ray Train's result then
    carries the divergence, and a restarted run stops instead of training broken weights. Tune
    checks every report for the search objectives, so they are present (as NaN)."""
    nan = float("nan")
    report = {**record, "epoch": epoch, "diverged": True, **dict.fromkeys(objectives, nan)}
    with tempfile.TemporaryDirectory() as directory:
        if session.rank == 0:
            torch.save({"diverged": True, "epoch": epoch, "history": history}, Path(directory) / CHECKPOINT_FILE)
        session.report(report, directory if session.rank == 0 else None)


def worker_loop(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs (``train_student_loop`` in a Ray Train session)."""
    config = ExperimentConfig.from_dict(loop_config["config"])
    train_student_loop(loop_config, ray_train_session(config.distill.head_warmup_epochs > 0))


def _epoch_loaders(
    config: ExperimentConfig, data: DistillData | StreamData, session: LoopSession, start_epoch: int
) -> Callable[[int], DataLoader]:
    """This rank's batches for an epoch: the in-memory tensors (one loader, its sampler and
    augmentation set to the epoch: the plain loop's draws), or a streamed split's shards read per
    batch (``data.storage: stream``)."""
    world, rank, seed = session.world, session.rank, config.distill.seed
    if isinstance(data, StreamData):
        return lambda epoch: session.prepare_loader(stream_loader(config, data, epoch, world, rank))
    dataset = distill_dataset(data.splits.train, data.teacher_outputs["train"])
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    collate = AugmentCollate(seed, start_epoch) if config.data.augment_on else None
    loader = session.prepare_loader(
        DataLoader(dataset, batch_size=config.distill.batch_size // world, sampler=sampler, collate_fn=collate)
    )

    def for_epoch(epoch: int) -> DataLoader:
        sampler.set_epoch(epoch)
        if collate is not None:  # the same draws for (seed, epoch, batch) as the plain loop
            collate.epoch, collate.batch = epoch, 0
        return loader

    return for_epoch


def train_student_loop(
    loop_config: dict[str, Any], session: LoopSession
) -> tuple[StudentNet, list[dict[str, Any]]] | None:
    """Resume from the session's checkpoint, train, report every epoch with a checkpoint; return
    the trained student (on the CPU) and the per-epoch history, or None when the run diverged.

    The first report of each run attempt carries ``timings``: wall-clock stamps of the worker's
    start-up phases (process start, imports done, loop entered, data fetched, first epoch started
    / trained / evaluated), so a trial's fixed cost can be measured (bench/trial_overhead.py)."""
    timings: dict[str, float] = {"worker_imports_done": _IMPORTED_AT, "worker_loop_entered": time.time()}
    started = process_started_at()
    if started is not None:
        timings["worker_process_started"] = started
    config = ExperimentConfig.from_dict(loop_config["config"])
    data: DistillData | StreamData = ray.get(loop_config["data_ref"])
    timings["data_ready"] = time.time()
    world, rank, device = session.world, session.rank, session.device
    settings = config.distill
    if config.ray.threads_per_worker:
        torch.set_num_threads(config.ray.threads_per_worker)
    torch.manual_seed(settings.seed)
    student = build_student(config, data.splits)
    optimizer, scheduler = make_optimizer(config, student)
    start_epoch = 0
    history: list[dict[str, Any]] = []
    if session.checkpoint is not None:
        state = read_checkpoint(session.checkpoint)
        if state.get("diverged"):
            return None  # a restarted run that had already diverged: nothing left to train
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch = int(state["epoch"]) + 1
        history = list(state["history"])
    model = session.prepare_model(student)
    teacher = data.live_teacher(config)
    teacher = teacher.to(device) if teacher is not None else None
    epoch_loader = _epoch_loaders(config, data, session, start_epoch)
    amp_dtype = _amp_dtype(config, device)
    node_ids = worker_node_ids()
    bare = model.module if hasattr(model, "module") else model
    for epoch in range(start_epoch, settings.epochs):
        maybe_kill_worker(config, epoch, loop_config["run_folder"], last_rank=rank == world - 1)
        loader = epoch_loader(epoch)
        if timings:
            timings["first_epoch_started"] = time.time()
        record = train_one_epoch(
            model, loader, optimizer, config, epoch, teacher=teacher, device=device, amp_dtype=amp_dtype
        )
        if timings:
            timings["first_epoch_trained"] = time.time()
        scheduler.step()
        if _any_rank_diverged(record["train_total"], device):
            _report_divergence(session, record, epoch, history, loop_config["objectives"])
            return None
        last = epoch == settings.epochs - 1
        record.update(_gather_evaluation(bare, "val", data, config, device, diagnostics=last))
        if timings:
            timings["first_evaluated"] = time.time()
        record.update({"epoch": epoch, "start_epoch": start_epoch, "workers": world, "diverged": False})
        record["node_ids"] = node_ids
        record["wall_time"] = time.time()
        history.append(record)
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                torch.save(
                    training_state(bare, optimizer, scheduler, epoch, history), Path(directory) / CHECKPOINT_FILE
                )
            report = record
            if timings:  # only in this attempt's first report, never in the history
                report = {**record, "timings": {**timings, "first_report": time.time()}}
                timings = {}
            session.report(report, directory if rank == 0 else None)
    return bare.cpu().eval(), history


def read_checkpoint(checkpoint: Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
