"""The teacher: trained once (or loaded from ``teacher.checkpoint``) and saved under a content
hash of its training config and the exact data, so every later run and trial reuses it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xkd_ray.config.registries import EXPLAINERS
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.checkpoints import (
    file_hash,
    load_state_dict_file,
    load_weights_into,
    read_json,
    stable_hash,
    write_model_folder,
)
from xkd_ray.core.metrics import accuracy
from xkd_ray.core.models import autocast, build_teacher, find_layer, predict_logits
from xkd_ray.core.progress import track
from xkd_ray.core.teacher_input import TeacherInput, resolve, student_view
from xkd_ray.data.splits import Splits
from xkd_ray.errors import XKDCheckpointError


@dataclass
class Teacher:
    model: nn.Module
    teacher_id: str
    metrics: dict[str, float]


def teacher_id(config: ExperimentConfig, splits: Splits) -> str:
    """Hash of what the teacher's weights depend on: its training config and the exact data."""
    ignored = ("checkpoint", "weights", "input_size", "mean", "std")  # the contract: only when declared
    settings = {k: v for k, v in config.to_dict()["teacher"].items() if k not in ignored}
    return stable_hash({"teacher": settings | config.teacher.contract(), "data": splits.fingerprint()})


def _keyed(identity: dict[str, Any], config: ExperimentConfig) -> str:
    """A given teacher's id: its file and the data, plus the input contract when one is declared
    (the same weights fed other tensors give other logits and maps)."""
    contract = config.teacher.contract()
    return stable_hash({**identity, "contract": contract} if contract else identity)


def teacher_input(config: ExperimentConfig, splits: Splits) -> TeacherInput:
    """``teacher.input_size/mean/std`` resolved against the data (None: the student's own)."""
    mean = getattr(splits, "mean", None) or splits.train.mean  # streamed splits keep them per split
    std = getattr(splits, "std", None) or splits.train.std
    return resolve(config.teacher, mean, std, splits.image_size, splits.in_channels)


def teacher_architecture(config: ExperimentConfig, splits: Splits) -> dict[str, Any]:
    """The arguments of ``build_teacher``: saved with the weights so a checkpoint rebuilds alone."""
    return {
        "arch": config.teacher.arch,
        "in_channels": splits.in_channels,
        "num_classes": splits.num_classes,
        "width": config.teacher.width,
    }


def make_teacher_optimizer(
    config: ExperimentConfig, model: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW + a per-epoch cosine schedule: one definition for the plain loop and the Ray loop,
    so a teacher trained either way follows the same recipe."""
    settings = config.teacher
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)


def train_teacher_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    inputs: TeacherInput | None = None,
) -> tuple[torch.Tensor, int]:
    """One pass of cross-entropy training over ``loader``.

    Returns the *sum* of per-image losses (a tensor on ``device``, never synced to the host inside
    the loop) and the number of images, so DDP workers can all-reduce both before dividing: the
    mean over shards of per-shard means would weigh a short last shard wrongly. ``inputs``: the
    teacher's input contract, applied to each batch (None: the batch as it is)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), device=device)
    count = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        if inputs is not None:
            images = inputs(images)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp_dtype):
            loss = loss_fn(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        count += len(labels)
    return loss_sum, count


def train_teacher(config: ExperimentConfig, splits: Splits, progress: bool = True) -> nn.Module:
    """Plain single-process supervised training (AdamW + cosine schedule); the teacher is then frozen."""
    settings = config.teacher
    torch.manual_seed(settings.seed)
    model = build_teacher(**teacher_architecture(config, splits))
    optimizer, scheduler = make_teacher_optimizer(config, model)
    dataset = TensorDataset(splits.train.images, splits.train.labels)
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator)
    with track("teacher epochs", settings.epochs, progress) as bar:
        for _ in range(settings.epochs):
            loss_sum, count = train_teacher_epoch(model, loader, optimizer, inputs=teacher_input(config, splits))
            scheduler.step()
            bar.advance(loss=float(loss_sum) / count)
    return model.eval()


def split_accuracies(
    model: nn.Module, splits: Splits, names: tuple[str, ...], inputs: TeacherInput | None = None
) -> dict[str, float]:
    """The teacher's accuracy on ``names``, each image fed through the contract ``inputs``; a
    streamed split (``data.streaming.StreamSplit``, no ``images``) is read a batch at a time."""
    view = student_view(model, inputs)
    found = {}
    for name in names:
        split = splits.split(name)
        if hasattr(split, "images"):
            found[f"{name}_accuracy"] = accuracy(predict_logits(view, split.images), split.labels)
            continue
        correct = sum(
            int((predict_logits(view, images).argmax(dim=1) == split.labels[ids]).sum())
            for ids, images in split.batches(256)
        )
        found[f"{name}_accuracy"] = correct / max(len(split), 1)
    return found


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
    identity = _keyed({"checkpoint": file_hash(weights), "data": splits.fingerprint()}, config)
    return Teacher(model, identity, split_accuracies(model, splits, ("test",), teacher_input(config, splits)))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or ``torch.save`` (loaded with ``weights_only=True``)."""
    if path.suffix != ".safetensors":
        return load_state_dict_file(path)
    if not path.is_file():
        raise XKDCheckpointError(f"teacher.weights: {path}: file not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise XKDCheckpointError(f"teacher.weights: {path}: not a loadable safetensors file ({exc})") from exc


def _load_weights(config: ExperimentConfig, splits: Splits) -> Teacher:
    """``teacher.weights``: a user's trained model, never retrained; keyed by file hash + data.

    The head size and ``explain.layer`` are checked here, at load, so a mismatch is one line
    before any explanation or student work starts."""
    path = Path(config.teacher.weights or "")
    model = build_teacher(**teacher_architecture(config, splits))
    target = getattr(model, "net", model) if config.teacher.arch.startswith("torchvision.") else model
    state = _read_weights(path)
    expected = target.state_dict()
    head = next(k for k in reversed(expected) if k.endswith("weight") and expected[k].ndim == 2) if expected else None
    if head is not None and head in state and state[head].shape[0] != expected[head].shape[0]:
        raise XKDCheckpointError(
            f"teacher.weights: {path} has a {state[head].shape[0]}-class head ({head}); "
            f"the dataset has {splits.num_classes} classes"
        )
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise XKDCheckpointError(f"teacher.weights: {path} does not fit {config.teacher.arch} ({first})") from exc
    model.eval()
    if EXPLAINERS[config.explain.explainer].uses_layer:
        find_layer(model, config.explain.layer)
    identity = _keyed({"weights": file_hash(path), "data": splits.fingerprint()}, config)
    return Teacher(model, identity, split_accuracies(model, splits, ("val", "test"), teacher_input(config, splits)))


def teacher_directory(config: ExperimentConfig, splits: Splits) -> Path:
    """Where the trained teacher is cached: the one folder every path (plain loop, Ray Train) writes
    and ``load_or_train_teacher`` reads."""
    return Path(config.explain.cache_dir) / "teachers" / f"teacher-{teacher_id(config, splits)}"


def cached_teacher(config: ExperimentConfig, splits: Splits) -> Teacher | None:
    """The teacher ``load_or_train_teacher`` would return without training, or None if it must train."""
    if config.teacher.weights:
        return _load_weights(config, splits)
    if config.teacher.checkpoint:
        return _load_checkpoint(config, splits)
    directory = teacher_directory(config, splits)
    if not (directory / "model.pt").exists():
        return None
    model = load_weights_into(build_teacher(**teacher_architecture(config, splits)), directory / "model.pt").eval()
    return Teacher(model, teacher_id(config, splits), read_json(directory / "metrics.json"))


def save_teacher(
    config: ExperimentConfig,
    splits: Splits,
    model: nn.Module,
    *,
    training: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> Teacher:
    """Write a freshly trained teacher into its cache folder (model.pt, config.json, metrics.json).

    ``training`` says how it was trained (``{"backend": "plain", "workers": 0}``, or Ray Train's
    worker count and node ids) and is kept in config.json, next to the architecture, so a cached
    teacher can be traced to the machines that made it. ``metrics``: the val/test accuracies when
    the caller already measured them (Ray workers do, to keep the driver light); else measured here.
    """
    model = model.eval()
    if metrics is None:
        metrics = split_accuracies(model, splits, ("val", "test"), teacher_input(config, splits))
    saved_config = {
        "architecture": teacher_architecture(config, splits),
        "teacher": config.to_dict()["teacher"],
        "data": splits.describe(),
        "training": training,
    }
    write_model_folder(teacher_directory(config, splits), model, saved_config, metrics)
    return Teacher(model, teacher_id(config, splits), dict(metrics))


def load_or_train_teacher(config: ExperimentConfig, splits: Splits, progress: bool = True) -> Teacher:
    """Reuse the teacher saved under its config hash (or ``teacher.checkpoint``); train it otherwise."""
    cached = cached_teacher(config, splits)
    if cached is not None:
        return cached
    model = train_teacher(config, splits, progress=progress)
    return save_teacher(config, splits, model, training={"backend": "plain", "workers": 0})
