"""One student's training and evaluation as plain functions, usable with or without Ray.

The Ray Train worker loop (``xkd_ray.cluster.ray_train``) calls ``train_one_epoch`` and
``student_predictions`` / ``split_metrics`` unchanged; only the model wrapping and the data
sharding differ. Which loss terms are on is the method's registry entry (``methods.METHODS``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from xkd_ray.config.methods import METHODS
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core import losses
from xkd_ray.core.augment import AugmentCollate
from xkd_ray.core.diagnostics import student_cost, student_diagnostics
from xkd_ray.core.explain import TeacherOutputs, explain_maps
from xkd_ray.core.faithfulness import faithfulness_subset
from xkd_ray.core.metrics import METRICS, metrics_of
from xkd_ray.core.models import StudentNet, StudentOutput, autocast
from xkd_ray.core.prepared import DistillData
from xkd_ray.core.progress import track
from xkd_ray.data.splits import Split, Splits
from xkd_ray.data.streaming import split_images
from xkd_ray.errors import XKDTrainingDiverged


def build_student(config: ExperimentConfig, splits: Splits) -> StudentNet:
    return StudentNet(
        in_channels=splits.in_channels,
        num_classes=splits.num_classes,
        width=config.student.width,
        ae_depth=config.student.ae_depth if METHODS[config.distill.method].head else None,
        ae_width=config.student.ae_width,
        fusion=config.student.fusion,
    )


def distill_dataset(split: Split, outputs: TeacherOutputs) -> TensorDataset:
    """Images travel with their labels and the teacher's cached logits and maps."""
    return TensorDataset(split.images, split.labels, outputs.logits, outputs.maps)


def make_optimizer(config: ExperimentConfig, student: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    settings = config.distill
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)


def _head_only_gradients(student: nn.Module) -> None:
    """During head warm-up only the head may change: AdamW applies weight decay to every
    parameter with a gradient, even a zero one, so the classifier's gradients are dropped."""
    bare = student.module if hasattr(student, "module") else student
    for name, parameter in bare.named_parameters():
        if not name.startswith("head."):
            parameter.grad = None


def train_one_epoch(
    student: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    config: ExperimentConfig,
    epoch: int,
    *,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss term.

    During head warm-up epochs only the explanation loss is optimised (the two-stage variant);
    otherwise the method's registry entry decides which terms of the joint loss are on.
    """
    settings = config.distill
    method = METHODS[settings.method]
    warming_up = method.head and epoch < settings.head_warmup_epochs
    weights = method.loss_weights(
        settings.alpha, settings.beta, settings.at_weight, settings.e2kd_weight, settings.honesty_weight
    )
    if weights["at_weight"] > 0 and teacher is None:
        raise ValueError(f"method {settings.method!r} needs the teacher model")
    student.train()
    sums: dict[str, float] = {}
    batches = 0
    for images, labels, teacher_logits, teacher_maps in loader:
        images, labels = images.to(device), labels.to(device)
        teacher_logits, teacher_maps = teacher_logits.to(device), teacher_maps.to(device)
        optimizer.zero_grad(set_to_none=True)
        gradient_map = weights["e2kd_weight"] > 0 and method.student_map == "gradient" and not warming_up
        images.requires_grad_(gradient_map)  # e2kd_grad differentiates the scores w.r.t. the pixels
        with autocast(device, amp_dtype):
            output = student(images, return_all=True)
            if warming_up:
                parts = {"explanation": losses.explanation_loss(output.maps, teacher_maps, settings.explanation_loss)}
                # Keep every parameter in the graph (DDP expects gradients for all of them).
                parts["total"] = parts["explanation"] + 0.0 * output.logits.sum()
            else:
                teacher_features = student_cams = None
                if weights["at_weight"] > 0:
                    with torch.no_grad():
                        teacher_features = teacher.stages(images)
                if weights["e2kd_weight"] > 0 or weights["honesty_weight"] > 0 or method.head_target == "own":
                    student_cams = _own_map(student, output, images, teacher_logits.argmax(dim=1), config, gradient_map)
                parts = losses.distillation_loss(
                    output.logits.float(),
                    labels,
                    teacher_logits,
                    temperature=settings.temperature,
                    **weights,
                    predicted_maps=None if output.maps is None else output.maps.float(),
                    teacher_maps=teacher_maps,
                    explanation_kind=settings.explanation_loss,
                    student_features=output.features,
                    teacher_features=teacher_features,
                    student_cams=None if student_cams is None else student_cams.float(),
                    e2kd_kind=settings.e2kd_loss,
                    head_targets=student_cams.detach().float() if method.head_target == "own" else None,
                )
        parts["total"].backward()
        if warming_up:
            _head_only_gradients(student)
        optimizer.step()
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        batches += 1
    return {f"train_{name}": total / max(batches, 1) for name, total in sums.items()}


def _own_map(
    student: nn.Module,
    output: StudentOutput,
    images: torch.Tensor,
    targets: torch.Tensor,
    config: ExperimentConfig,
    gradient_map: bool,
) -> torch.Tensor:
    """The student's own map for the teacher's top-1 class, trainable: e2KD's input, the honesty
    term's and xd_e2kd_own's. Grad-CAM of its last conv block, or (e2kd_grad) its gradient map,
    a k-step IG when ``distill.student_ig_steps`` > 1 with an IG teacher."""
    explain = config.explain
    scores = output.logits.gather(1, targets.unsqueeze(1))[:, 0]
    if not gradient_map:
        return losses.differentiable_gradcam(output.features[-1], scores, images.shape[-2:])
    steps = config.distill.student_ig_steps if explain.explainer == "integrated_gradients" else 1
    if steps == 1:
        return losses.differentiable_gradient_map(images, scores, explain.explainer, explain.blur_sigma)
    # The k scaled copies go through the bare module, since DDP's wrapper expects one forward per
    # backward (multi-worker training with student_ig_steps > 1 is not covered by a test).
    return losses.differentiable_integrated_gradients(
        getattr(student, "module", student), images, targets, steps, explain.blur_sigma
    )


class StudentPredictions(NamedTuple):
    """What evaluation needs from the student on some images (CPU tensors)."""

    logits: torch.Tensor
    head_maps: torch.Tensor | None
    posthoc_maps: torch.Tensor
    diagnostics: dict[str, torch.Tensor] | None = None  # per image, when asked (``_diagnostics``)
    cost: dict[str, float] | None = None  # params, latency_ms (``student_cost``)


def _posthoc_maps(student: nn.Module, images: torch.Tensor, targets: torch.Tensor, config: ExperimentConfig):
    return explain_maps(
        student,
        images,
        targets,
        explainer=config.explain.explainer,
        layer=None,
        ig_steps=config.explain.ig_steps,
        blur_sigma=config.explain.blur_sigma,
        batch_size=config.explain.batch_size,
    ).maps


def student_predictions(
    student: StudentNet,
    images: torch.Tensor,
    teacher_predictions: torch.Tensor,
    config: ExperimentConfig,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    diagnostics: np.ndarray | None = None,
    ids: np.ndarray | None = None,
    split: str = "test",
) -> StudentPredictions:
    """Logits, head maps (or None) and post-hoc captum maps for the teacher's predicted class;
    with ``diagnostics`` (positions in ``images``: the faithfulness subset, or a shard's part of
    it), also the per-image faithfulness measurements of those images (costlier: asked for once
    per split and run, at its end). ``ids``: those images' indices in the split (default: the
    positions), which seed their random draws; ``split`` decides whether ROAD runs (``faithfulness.road``)."""
    student.eval()
    logits, maps = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            output = student(images[start : start + batch_size].to(device), return_all=True)
            logits.append(output.logits.float().cpu())
            if output.maps is not None:
                maps.append(output.maps.float().cpu())
    posthoc = _posthoc_maps(student, images, teacher_predictions, config)
    cost = student_cost(student, images[0]) if len(images) else None
    predictions = StudentPredictions(torch.cat(logits), torch.cat(maps) if maps else None, posthoc, cost=cost)
    if diagnostics is not None and len(diagnostics) == 0:  # a shard holding none of the subset
        predictions = predictions._replace(diagnostics={})
    elif diagnostics is not None:
        chosen = torch.as_tensor(np.asarray(diagnostics, dtype=np.int64))
        settings = config.faithfulness
        found = student_diagnostics(
            student,
            images[chosen],
            teacher_predictions[chosen],
            None if predictions.head_maps is None else predictions.head_maps[chosen],
            posthoc[chosen],
            torch.as_tensor(np.asarray(diagnostics if ids is None else ids, dtype=np.int64)),
            lambda model, some, targets: _posthoc_maps(model, some, targets, config),
            seed=config.distill.seed,
            road=settings.road_on(split),
            road_steps=settings.road_steps,
            mprt=settings.mprt,
        )
        predictions = predictions._replace(diagnostics=found)
    return predictions


def split_metrics(
    data: DistillData,
    split_name: str,
    config: ExperimentConfig,
    predictions: StudentPredictions,
    outputs: TeacherOutputs | None = None,
) -> dict[str, float]:
    """Every registered metric of one whole split, from the student's predictions on it
    (``outputs``: the split's teacher outputs when the caller already read them whole)."""
    outputs = outputs if outputs is not None else data.teacher_outputs[split_name].whole()
    diagnostics = None
    if predictions.diagnostics is not None:
        diagnostics = {**predictions.diagnostics, **(outputs.faithfulness or {})}
    return metrics_of(
        predictions, data.splits.split(split_name).labels, outputs, data.template_map, config.distill.seed, diagnostics
    )


def evaluate(
    student: StudentNet,
    data: DistillData,
    split_name: str,
    config: ExperimentConfig,
    *,
    device: Any = "cpu",
    diagnostics: bool = True,
) -> dict[str, float]:
    """The one evaluation entry point: a student on one split of the prepared data, every metric
    (``diagnostics=False``: a cheap mid-run look, without the faithfulness measurements)."""
    split = data.splits.split(split_name)
    outputs = data.teacher_outputs[split_name].whole()  # read once (from disk, for a streamed split)
    subset = faithfulness_subset(split.labels, config.faithfulness.images, config.faithfulness.seed)
    predictions = student_predictions(
        student,
        split_images(split, slice(0, len(split))),
        outputs.predictions,
        config,
        device=device,
        diagnostics=subset if diagnostics else None,
        split=split_name,
    )
    return split_metrics(data, split_name, config, predictions, outputs)


def final_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The validation metrics of the last epoch (each run evaluates val once per epoch, never again)."""
    return {name: history[-1][name] for name in METRICS}


EpochCallback = Callable[[int, dict[str, float], StudentNet], None]


def distill(
    config: ExperimentConfig,
    data: DistillData,
    *,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    evaluate_every_epoch: bool = False,
) -> tuple[StudentNet, dict[str, Any]]:
    """Train one student in this process and return it with its val/test metrics."""
    torch.manual_seed(config.distill.seed)
    student = build_student(config, data.splits)
    optimizer, scheduler = make_optimizer(config, student)
    teacher = data.live_teacher(config)
    history: list[dict[str, float]] = []
    with track(f"student epochs ({config.distill.method})", config.distill.epochs, progress) as bar:
        for epoch in range(config.distill.epochs):
            loader = epoch_loader(config, data, epoch)
            record = {"epoch": epoch, **train_one_epoch(student, loader, optimizer, config, epoch, teacher=teacher)}
            scheduler.step()
            if not math.isfinite(record["train_total"]):
                raise XKDTrainingDiverged(f"distill: the loss became NaN/inf at epoch {epoch}; lower distill.lr")
            if epoch == config.distill.epochs - 1:
                record.update(evaluate(student, data, "val", config))
            elif evaluate_every_epoch:
                record.update(evaluate(student, data, "val", config, diagnostics=False))
            record["wall_time"] = time.time()
            history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record, student)
            shown = {"loss": record["train_total"], "val_acc": record.get("accuracy")}
            bar.advance(**{key: value for key, value in shown.items() if value is not None})
    metrics = {
        "val": final_metrics(history),
        "test": evaluate(student, data, "test", config),
        "teacher": data.teacher_metrics,
        "history": history,
    }
    return student, metrics


def epoch_loader(config: ExperimentConfig, data: DistillData, epoch: int) -> DataLoader:
    """The same sampler Ray Train workers use (one replica here): the batch order depends only on
    (seed, epoch), so the plain loop, a resumed run and any worker count see the same global batches."""
    dataset = distill_dataset(data.splits.train, data.teacher_outputs["train"])
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=config.distill.seed)
    sampler.set_epoch(epoch)
    collate = AugmentCollate(config.distill.seed, epoch) if config.data.augment_on else None
    return DataLoader(dataset, batch_size=config.distill.batch_size, sampler=sampler, collate_fn=collate)


def save_student(
    directory: str | Path, config: ExperimentConfig, student: StudentNet, data: DistillData, metrics: dict[str, Any]
) -> Path:
    """config.json holds enough to rebuild the student without the experiment's code paths;
    preprocessing.json and card.md make the folder usable on its own (``xkd_ray.student.card``)."""
    from xkd_ray.student.card import write_student_folder

    return write_student_folder(directory, config, student, data, metrics)
