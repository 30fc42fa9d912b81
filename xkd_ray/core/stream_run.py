"""``xkd distill`` on streamed data: the teacher, its maps and one student, batch by batch.

The in-memory path (``prepared.prepare`` + ``distill.distill``) is untouched; this module reuses
its pieces (``train_teacher_epoch``, ``train_one_epoch``, ``student_predictions``,
``compute_metrics``) and only swaps where batches come from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from xkd_ray.config.methods import METHODS
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.checkpoints import write_model_folder
from xkd_ray.core.distill import (
    build_student,
    evaluate,
    final_metrics,
    make_optimizer,
    train_one_epoch,
)
from xkd_ray.core.explain import explain_settings
from xkd_ray.core.models import StudentNet, build_teacher
from xkd_ray.core.progress import track
from xkd_ray.core.streamed import StreamTeacherOutputs, stream_epoch_loader, stream_teacher_outputs
from xkd_ray.core.teacher import (
    cached_teacher,
    make_teacher_optimizer,
    split_accuracies,
    teacher_architecture,
    teacher_directory,
    teacher_id,
    teacher_input,
    train_teacher_epoch,
)
from xkd_ray.data.splits import SPLIT_NAMES
from xkd_ray.data.streaming import StreamSplits, stream_imagefolder
from xkd_ray.errors import XKDConfigError, XKDTrainingDiverged


@dataclass
class StreamData:
    """``DistillData``'s counterpart: paths and small arrays only, so it pickles in bytes."""

    splits: StreamSplits
    teacher_outputs: dict[str, StreamTeacherOutputs]
    teacher_architecture: dict[str, Any]
    teacher_state: dict[str, torch.Tensor]
    teacher_id: str
    teacher_metrics: dict[str, float]
    cache_hits: dict[str, bool] = field(default_factory=dict)

    @property
    def template_map(self) -> torch.Tensor:
        return self.teacher_outputs["train"].template_map

    def teacher(self) -> nn.Module:
        model = build_teacher(**self.teacher_architecture)
        model.load_state_dict(self.teacher_state)
        return model.eval()

    def live_teacher(self, config: ExperimentConfig) -> None:
        """Streamed batches carry the teacher's cached logits and maps, never the network: a
        method that trains on its features is refused (``refuse_live_teacher``)."""
        refuse_live_teacher(config.distill.method)


def _teacher(config: ExperimentConfig, splits: StreamSplits, progress: bool) -> tuple[nn.Module, str, dict]:
    """The cached teacher for this data, else one trained here on streamed batches (the recipe of
    ``teacher.train_teacher``: AdamW, cosine, shuffled batches of ``teacher.batch_size``)."""
    found = cached_teacher(config, splits)  # type: ignore[arg-type]  # duck-typed: fingerprint, classes, channels
    if found is not None:
        return found.model, found.teacher_id, dict(found.metrics)
    settings = config.teacher
    inputs = teacher_input(config, splits)  # type: ignore[arg-type]
    torch.manual_seed(settings.seed)
    architecture = teacher_architecture(config, splits)  # type: ignore[arg-type]
    model = build_teacher(**architecture)
    optimizer, scheduler = make_teacher_optimizer(config, model)
    generator = torch.Generator().manual_seed(settings.seed)
    sampler = BatchSampler(RandomSampler(range(len(splits.train)), generator=generator), settings.batch_size, False)
    train = splits.train
    with track("teacher epochs (streamed)", settings.epochs, progress) as bar:
        for _ in range(settings.epochs):
            batches = ((train.read(ids), train.labels[torch.as_tensor(ids)]) for ids in sampler)
            loss_sum, count = train_teacher_epoch(model, batches, optimizer, inputs=inputs)
            scheduler.step()
            bar.advance(loss=float(loss_sum) / count)
    model.eval()
    metrics = split_accuracies(model, splits, ("val", "test"), inputs)  # type: ignore[arg-type]
    record = {"architecture": architecture, "teacher": config.to_dict()["teacher"], "data": splits.describe()}
    write_model_folder(teacher_directory(config, splits), model, {**record, "training": {"backend": "stream"}}, metrics)  # type: ignore[arg-type]
    return model, teacher_id(config, splits), metrics  # type: ignore[arg-type]


def prepare_stream(config: ExperimentConfig, progress: bool = True) -> StreamData:
    """Shards, teacher and the teacher's maps for every split, each written once and reused."""
    splits = stream_imagefolder(config.data, config.explain.cache_dir)
    model, identity, metrics = _teacher(config, splits, progress)
    explain = config.explain
    settings = explain_settings(explain.explainer, explain.layer, explain.ig_steps, explain.blur_sigma)
    outputs, hits = {}, {}
    for name in SPLIT_NAMES:
        outputs[name], hits[name] = stream_teacher_outputs(
            model,
            identity,
            splits.split(name),
            name,
            splits.fingerprint(),
            settings,
            batch_size=explain.batch_size,
            cache_dir=explain.cache_dir,
            inputs=teacher_input(config, splits),  # type: ignore[arg-type]
        )
    for name in ("val", "test"):
        metrics[f"{name}_degenerate_maps"] = outputs[name].degenerate_maps
    return StreamData(
        splits=splits,
        teacher_outputs=outputs,
        teacher_architecture=teacher_architecture(config, splits),  # type: ignore[arg-type]
        teacher_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        teacher_id=identity,
        teacher_metrics=metrics,
        cache_hits=hits,
    )


def stream_loader(config: ExperimentConfig, data: StreamData, epoch: int, world: int = 1, rank: int = 0) -> DataLoader:
    """One epoch's batches for this rank: ``distill.batch_size`` split over ``world`` ranks, as the
    in-memory loop splits it."""
    return stream_epoch_loader(
        data.splits.train,
        data.teacher_outputs["train"],
        batch_size=config.distill.batch_size // world,
        seed=config.distill.seed,
        epoch=epoch,
        augment=config.data.augment_on,
        num_replicas=world,
        rank=rank,
    )


def refuse_live_teacher(method: str) -> None:
    if METHODS[method].needs_teacher:
        raise XKDConfigError(f"distill.method: {method!r} needs the live teacher; not with data.storage=stream")


def distill_stream(
    config: ExperimentConfig, data: StreamData, *, progress: bool = True, evaluate_val: bool = True
) -> tuple[StudentNet, dict[str, Any]]:
    """``distill.distill`` over streamed batches in one process (``xkd distill`` without ``--workers``;
    a trial and a Ray Train rank read streams through ``ray_train.train_student_loop``)."""
    refuse_live_teacher(config.distill.method)
    torch.manual_seed(config.distill.seed)
    student = build_student(config, data.splits)  # type: ignore[arg-type]
    optimizer, scheduler = make_optimizer(config, student)
    history: list[dict[str, Any]] = []
    with track(f"student epochs ({config.distill.method}, streamed)", config.distill.epochs, progress) as bar:
        for epoch in range(config.distill.epochs):
            started = time.perf_counter()
            record: dict[str, Any] = {"epoch": epoch}
            record.update(train_one_epoch(student, stream_loader(config, data, epoch), optimizer, config, epoch))
            record["epoch_seconds"] = time.perf_counter() - started
            scheduler.step()
            if not math.isfinite(record["train_total"]):
                raise XKDTrainingDiverged(f"distill: the loss became NaN/inf at epoch {epoch}; lower distill.lr")
            if evaluate_val and epoch == config.distill.epochs - 1:
                record.update(evaluate(student, data, "val", config))  # type: ignore[arg-type]
            history.append(record)
            bar.advance(loss=record["train_total"])
    metrics: dict[str, Any] = {"teacher": data.teacher_metrics, "history": history}
    if evaluate_val:
        metrics["val"] = final_metrics(history)
        metrics["test"] = evaluate(student, data, "test", config)  # type: ignore[arg-type]
    return student, metrics
