"""The teacher: trained once (or loaded from ``teacher.checkpoint``) and saved under a content
hash of its training config and the exact data, so every later run and trial reuses it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xkd_ray.checkpoints import file_hash, load_weights_into, read_json, stable_hash, write_model_folder
from xkd_ray.config import ExperimentConfig
from xkd_ray.errors import XKDCheckpointError
from xkd_ray.metrics import accuracy
from xkd_ray.models import build_teacher, predict_logits
from xkd_ray.progress import track
from xkd_ray.splits import Splits


@dataclass
class Teacher:
    model: nn.Module
    teacher_id: str
    metrics: dict[str, float]


def teacher_id(config: ExperimentConfig, splits: Splits) -> str:
    """Hash of what the teacher's weights depend on: its training config and the exact data."""
    settings = {k: v for k, v in config.to_dict()["teacher"].items() if k != "checkpoint"}
    return stable_hash({"teacher": settings, "data": splits.fingerprint()})


def teacher_architecture(config: ExperimentConfig, splits: Splits) -> dict[str, Any]:
    """The arguments of ``build_teacher``: saved with the weights so a checkpoint rebuilds alone."""
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
    model = build_teacher(**teacher_architecture(config, splits))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    dataset = TensorDataset(splits.train.images, splits.train.labels)
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator)
    loss_fn = nn.CrossEntropyLoss()
    with track("teacher epochs", settings.epochs, progress) as bar:
        for _ in range(settings.epochs):
            model.train()
            loss_sum: torch.Tensor | float = 0.0
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(images), labels)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(labels)
            scheduler.step()
            bar.advance(loss=float(loss_sum) / len(dataset))
    return model.eval()


def _split_accuracies(model: nn.Module, splits: Splits, names: tuple[str, ...]) -> dict[str, float]:
    return {
        f"{name}_accuracy": accuracy(predict_logits(model, splits.split(name).images), splits.split(name).labels)
        for name in names
    }


def _load_checkpoint(config: ExperimentConfig, splits: Splits) -> Teacher:
    """A user-supplied teacher: a ``model.pt`` file, or a folder with model.pt + config.json."""
    architecture = teacher_architecture(config, splits)
    directory = Path(config.teacher.checkpoint)
    weights = directory / "model.pt" if directory.is_dir() else directory
    saved = read_json(weights.parent / "config.json").get("architecture") if directory.is_dir() else None
    if saved is not None and saved != architecture:
        raise XKDCheckpointError(
            f"{weights}: teacher was saved as {saved}, but this run needs {architecture}; "
            "check teacher.arch/teacher.width and the dataset"
        )
    model = load_weights_into(build_teacher(**architecture), weights).eval()
    identity = stable_hash({"checkpoint": file_hash(weights), "data": splits.fingerprint()})
    return Teacher(model, identity, _split_accuracies(model, splits, ("test",)))


def load_or_train_teacher(config: ExperimentConfig, splits: Splits, progress: bool = True) -> Teacher:
    """Reuse the teacher saved under its config hash (or ``teacher.checkpoint``); train it otherwise."""
    if config.teacher.checkpoint:
        return _load_checkpoint(config, splits)
    architecture = teacher_architecture(config, splits)
    identity = teacher_id(config, splits)
    directory = Path(config.explain.cache_dir) / "teachers" / f"teacher-{identity}"
    if (directory / "model.pt").exists():
        model = load_weights_into(build_teacher(**architecture), directory / "model.pt").eval()
        return Teacher(model, identity, read_json(directory / "metrics.json"))
    model = train_teacher(config, splits, progress=progress)
    metrics = _split_accuracies(model, splits, ("val", "test"))
    saved_config = {"architecture": architecture, "teacher": config.to_dict()["teacher"], "data": splits.describe()}
    write_model_folder(directory, model, saved_config, metrics)
    return Teacher(model, identity, metrics)
