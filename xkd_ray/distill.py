"""One training run (teacher or student) as plain functions, usable with or without Ray.

The Ray Train worker loop (``xkd_ray.train``) calls ``train_one_epoch`` and
``evaluate_student`` unchanged; only the model wrapping and the data sharding differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from xkd_ray.config import ExperimentConfig, stable_hash
from xkd_ray.data import Split, Splits, load_splits
from xkd_ray.errors import XKDCheckpointError, XKDTrainingDiverged
from xkd_ray.explain import TeacherOutputs, cached_teacher_outputs, explain_maps
from xkd_ray.losses import distillation_loss, explanation_loss
from xkd_ray.metrics import accuracy, agreement, fidelity, template_fidelity, topk_iou
from xkd_ray.models import StudentNet, build_teacher

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- checkpoints


def write_model_folder(
    directory: str | Path, model: nn.Module, config: dict[str, Any], metrics: dict[str, Any]
) -> Path:
    """Write model.pt + config.json + metrics.json into a temp folder, then rename it into place,
    so readers only ever see a complete folder."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, staging / "model.pt")
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights only: ``weights_only=True`` refuses pickled code, so a malicious file cannot run."""
    path = Path(path)
    if not path.is_file():
        raise XKDCheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or hostile files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XKDCheckpointError(f"{path}: not a loadable weights file ({reason[:200]})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise XKDCheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return state


def load_weights_into(model: nn.Module, path: str | Path) -> nn.Module:
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise XKDCheckpointError(f"{path}: weights do not match the configured architecture ({first})") from exc
    return model


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise XKDCheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise XKDCheckpointError(f"{path}: not valid JSON ({exc})") from exc


# ----------------------------------------------------------------------------- teacher


@dataclass
class Teacher:
    model: nn.Module
    teacher_id: str
    path: Path
    metrics: dict[str, float]


def teacher_id(config: ExperimentConfig, splits: Splits) -> str:
    """Hash of what the teacher's weights depend on: its training config and the exact data."""
    settings = {k: v for k, v in config.to_dict()["teacher"].items() if k != "checkpoint"}
    return stable_hash({"teacher": settings, "data": splits.fingerprint()})


def _teacher_architecture(config: ExperimentConfig, splits: Splits) -> dict[str, Any]:
    return {
        "arch": config.teacher.arch,
        "in_channels": splits.in_channels,
        "num_classes": splits.num_classes,
        "width": config.teacher.width,
    }


def train_teacher(config: ExperimentConfig, splits: Splits, progress: bool = True) -> nn.Module:
    """Plain supervised training (AdamW + cosine schedule); the teacher is then frozen."""
    settings = config.teacher
    torch.manual_seed(settings.seed)
    model = build_teacher(**_teacher_architecture(config, splits))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    dataset = TensorDataset(splits.train.images, splits.train.labels)
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator)
    loss_fn = nn.CrossEntropyLoss()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("training teacher", total=settings.epochs)
        for _ in range(settings.epochs):
            model.train()
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(images), labels).backward()
                optimizer.step()
            scheduler.step()
            bar.advance(task)
    return model.eval()


def _predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat(
            [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
        )


def load_or_train_teacher(config: ExperimentConfig, splits: Splits, progress: bool = True) -> Teacher:
    """Reuse the teacher saved under its config hash (or ``teacher.checkpoint``); train it otherwise."""
    architecture = _teacher_architecture(config, splits)
    if config.teacher.checkpoint:
        directory = Path(config.teacher.checkpoint)
        weights = directory / "model.pt" if directory.is_dir() else directory
        saved = read_json(weights.parent / "config.json").get("architecture") if directory.is_dir() else None
        if saved is not None and saved != architecture:
            raise XKDCheckpointError(
                f"{weights}: teacher was saved as {saved}, but this run needs {architecture}; "
                "check teacher.arch/teacher.width and the dataset"
            )
        model = load_weights_into(build_teacher(**architecture), weights).eval()
        identity = stable_hash({"checkpoint": load_state_dict_file_hash(weights), "data": splits.fingerprint()})
        test_metrics = {"test_accuracy": accuracy(_predict_logits(model, splits.test.images), splits.test.labels)}
        return Teacher(model, identity, weights, test_metrics)

    identity = teacher_id(config, splits)
    directory = Path(config.explain.cache_dir) / "teachers" / f"teacher-{identity}"
    if (directory / "model.pt").exists():
        model = load_weights_into(build_teacher(**architecture), directory / "model.pt").eval()
        return Teacher(model, identity, directory, read_json(directory / "metrics.json"))
    model = train_teacher(config, splits, progress=progress)
    metrics = {
        f"{name}_accuracy": accuracy(_predict_logits(model, splits.split(name).images), splits.split(name).labels)
        for name in ("val", "test")
    }
    saved_config = {"architecture": architecture, "teacher": config.to_dict()["teacher"], "data": splits.describe()}
    write_model_folder(directory, model, saved_config, metrics)
    return Teacher(model, identity, directory, metrics)


def load_state_dict_file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- prepared data


@dataclass
class DistillData:
    """Everything a student run needs, as CPU tensors: picklable, so Ray can share it once."""

    splits: Splits
    teacher_outputs: dict[str, TeacherOutputs]
    template_map: torch.Tensor  # [H, W], mean training teacher map
    teacher_architecture: dict[str, Any]
    teacher_state: dict[str, torch.Tensor]
    teacher_id: str
    teacher_metrics: dict[str, float]
    cache_files: dict[str, str] = field(default_factory=dict)
    cache_hits: dict[str, bool] = field(default_factory=dict)

    def teacher(self) -> nn.Module:
        """A fresh frozen copy of the teacher (needed only by attention transfer)."""
        model = build_teacher(**self.teacher_architecture)
        model.load_state_dict(self.teacher_state)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model.eval()


def prepare(config: ExperimentConfig, progress: bool = True) -> DistillData:
    """Load the data, get the teacher, and read (or compute once) its cached explanations."""
    splits = load_splits(config.data)
    teacher = load_or_train_teacher(config, splits, progress=progress)
    outputs: dict[str, TeacherOutputs] = {}
    files: dict[str, str] = {}
    hits: dict[str, bool] = {}
    for name in SPLITS:
        outputs[name], path, hits[name] = cached_teacher_outputs(
            teacher.model,
            teacher.teacher_id,
            splits.split(name).images,
            name,
            splits.fingerprint(),
            explainer=config.explain.explainer,
            layer=config.explain.layer,
            ig_steps=config.explain.ig_steps,
            blur_sigma=config.explain.blur_sigma,
            batch_size=config.explain.batch_size,
            cache_dir=config.explain.cache_dir,
            progress=progress,
        )
        files[name] = str(path)
    teacher_metrics = dict(teacher.metrics)
    for name in ("val", "test"):
        teacher_metrics[f"{name}_degenerate_maps"] = outputs[name].degenerate_maps
    return DistillData(
        splits=splits,
        teacher_outputs=outputs,
        template_map=outputs["train"].maps.mean(dim=0),
        teacher_architecture=_teacher_architecture(config, splits),
        teacher_state={k: v.detach().cpu() for k, v in teacher.model.state_dict().items()},
        teacher_id=teacher.teacher_id,
        teacher_metrics=teacher_metrics,
        cache_files=files,
        cache_hits=hits,
    )


# ----------------------------------------------------------------------------- student


def build_student(config: ExperimentConfig, splits: Splits) -> StudentNet:
    return StudentNet(
        in_channels=splits.in_channels,
        num_classes=splits.num_classes,
        width=config.student.width,
        ae_depth=config.student.ae_depth if config.distill.has_head else None,
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

    During head warm-up epochs only the explanation loss is optimised (the two-stage
    variant); the method decides which terms are on (student: CE; kd: CE+KD; at: +AT; xd: +L_exp).
    """
    settings = config.distill
    method = settings.method
    warming_up = settings.has_head and epoch < settings.head_warmup_epochs
    alpha = 0.0 if method == "student" else settings.alpha
    beta = settings.beta if method == "xd" else 0.0
    at_weight = settings.at_weight if method == "at" else 0.0
    student.train()
    sums: dict[str, float] = {}
    batches = 0
    for images, labels, teacher_logits, teacher_maps in loader:
        images, labels = images.to(device), labels.to(device)
        teacher_logits, teacher_maps = teacher_logits.to(device), teacher_maps.to(device)
        optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            output = student(images, return_all=True)
            if warming_up:
                parts = {"explanation": explanation_loss(output.maps, teacher_maps, settings.explanation_loss)}
                # Keep every parameter in the graph (DDP expects gradients for all of them).
                parts["total"] = parts["explanation"] + 0.0 * output.logits.sum()
            else:
                teacher_features = None
                if at_weight > 0:
                    if teacher is None:
                        raise ValueError("method 'at' needs the teacher model")
                    with torch.no_grad():
                        teacher_features = teacher.stages(images)
                parts = distillation_loss(
                    output.logits.float(),
                    labels,
                    teacher_logits,
                    temperature=settings.temperature,
                    alpha=alpha,
                    beta=beta,
                    predicted_maps=None if output.maps is None else output.maps.float(),
                    teacher_maps=teacher_maps,
                    explanation_kind=settings.explanation_loss,
                    at_weight=at_weight,
                    student_features=output.features,
                    teacher_features=teacher_features,
                )
        parts["total"].backward()
        optimizer.step()
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        batches += 1
    return {f"train_{name}": total / max(batches, 1) for name, total in sums.items()}


def predict_student(
    student: StudentNet, images: torch.Tensor, batch_size: int = 256, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and (if there is a head) the head's maps, on CPU."""
    student.eval()
    logits, maps = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            output = student(images[start : start + batch_size].to(device), return_all=True)
            logits.append(output.logits.float().cpu())
            if output.maps is not None:
                maps.append(output.maps.float().cpu())
    return torch.cat(logits), (torch.cat(maps) if maps else None)


def student_predictions(
    student: StudentNet,
    images: torch.Tensor,
    teacher_predictions: torch.Tensor,
    config: ExperimentConfig,
    *,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Logits, head maps (or None) and post-hoc captum maps for the teacher's predicted class."""
    logits, head_maps = predict_student(student, images, device=device)
    posthoc = explain_maps(
        student,
        images,
        teacher_predictions,
        explainer=config.explain.explainer,
        layer=None,
        ig_steps=config.explain.ig_steps,
        blur_sigma=config.explain.blur_sigma,
        batch_size=config.explain.batch_size,
    ).maps
    return logits, head_maps, posthoc


def metrics_from_predictions(
    logits: torch.Tensor,
    head_maps: torch.Tensor | None,
    posthoc_maps: torch.Tensor,
    labels: torch.Tensor,
    outputs: TeacherOutputs,
    template_map: torch.Tensor,
    config: ExperimentConfig,
) -> dict[str, float]:
    """The two objectives and the diagnostics DESIGN.md asks for, on one whole split.

    ``fidelity`` uses the head's map when the student has one (that is the explanation it
    gives at inference) and captum on the student otherwise; ``fidelity_posthoc`` is always
    captum on the student, for the teacher's predicted class.
    """
    explanation = head_maps if head_maps is not None else posthoc_maps
    return {
        "accuracy": accuracy(logits, labels),
        "agreement": agreement(logits, outputs.logits),
        "fidelity": fidelity(explanation, outputs.maps),
        "fidelity_posthoc": fidelity(posthoc_maps, outputs.maps),
        "fidelity_template": template_fidelity(template_map, outputs.maps),
        "topk_iou": topk_iou(explanation, outputs.maps, seed=config.distill.seed),
        "degenerate_maps": outputs.degenerate_maps,
    }


def evaluate_student(
    student: StudentNet,
    split: Split,
    outputs: TeacherOutputs,
    template_map: torch.Tensor,
    config: ExperimentConfig,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    logits, head_maps, posthoc = student_predictions(student, split.images, outputs.predictions, config, device=device)
    return metrics_from_predictions(logits, head_maps, posthoc, split.labels, outputs, template_map, config)


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
    teacher = data.teacher() if config.distill.method == "at" else None
    history: list[dict[str, float]] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"distilling ({config.distill.method})", total=config.distill.epochs)
        for epoch in range(config.distill.epochs):
            loader = epoch_loader(config, data, epoch)
            record = {"epoch": epoch, **train_one_epoch(student, loader, optimizer, config, epoch, teacher=teacher)}
            scheduler.step()
            if not math.isfinite(record["train_total"]):
                raise XKDTrainingDiverged(f"distill: the loss became NaN/inf at epoch {epoch}; lower distill.lr")
            if evaluate_every_epoch or epoch == config.distill.epochs - 1:
                record.update(
                    evaluate_student(student, data.splits.val, data.teacher_outputs["val"], data.template_map, config)
                )
            record["wall_time"] = time.time()
            history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record, student)
            bar.advance(task)
    metrics = {
        "val": evaluate_student(student, data.splits.val, data.teacher_outputs["val"], data.template_map, config),
        "test": evaluate_student(student, data.splits.test, data.teacher_outputs["test"], data.template_map, config),
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
    return DataLoader(dataset, batch_size=config.distill.batch_size, sampler=sampler)


def student_record(config: ExperimentConfig, student: StudentNet, data: DistillData) -> dict[str, Any]:
    """What config.json holds: enough to rebuild the student without the experiment's code paths."""
    return {
        "architecture": student.architecture(),
        "experiment": config.to_dict(),
        "teacher_id": data.teacher_id,
        "data": data.splits.describe(),
    }


def save_student(
    directory: str | Path, config: ExperimentConfig, student: StudentNet, data: DistillData, metrics: dict[str, Any]
) -> Path:
    return write_model_folder(directory, student, student_record(config, student, data), metrics)


def load_student(directory: str | Path) -> tuple[StudentNet, dict[str, Any], dict[str, Any]]:
    """Rebuild a saved student from its folder (no Ray, no experiment code needed)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise XKDCheckpointError(f"{directory}: student folder not found")
    record = read_json(directory / "config.json")
    if not isinstance(record.get("architecture"), dict):
        raise XKDCheckpointError(f"{directory / 'config.json'}: no 'architecture' entry")
    try:
        model = StudentNet.from_architecture(record["architecture"])
    except XKDCheckpointError as exc:
        raise XKDCheckpointError(f"{directory / 'config.json'}: {exc}") from None
    student = load_weights_into(model, directory / "model.pt")
    metrics = read_json(directory / "metrics.json") if (directory / "metrics.json").exists() else {}
    return student.eval(), record, metrics
