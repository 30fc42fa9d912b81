"""Prepared data: the splits, the teacher and its cached explanations, as one picklable bundle.

``prepare`` runs once per run or search (before any trial); every student then trains on
``DistillData`` alone, without touching the teacher again unless its method needs the live
teacher (``Method.needs_teacher``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xkd_ray.config.methods import METHODS
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.explain import TeacherOutputs, cached_teacher_outputs
from xkd_ray.core.models import build_teacher
from xkd_ray.core.teacher import load_or_train_teacher, teacher_architecture, teacher_input
from xkd_ray.core.teacher_input import TeacherInput, student_view
from xkd_ray.data.datasets import load_splits
from xkd_ray.data.splits import SPLIT_NAMES, Splits, ZeroCopyPickle


@dataclass
class DistillData(ZeroCopyPickle):
    """Everything a student run needs, as CPU tensors: put into Ray's object store once per search,
    and read by every trial process on a node from that node's one shared copy (``ZeroCopyPickle``)."""

    splits: Splits
    teacher_outputs: dict[str, TeacherOutputs]
    template_map: torch.Tensor  # [H, W], mean training teacher map
    teacher_architecture: dict[str, Any]
    teacher_state: dict[str, torch.Tensor]
    teacher_id: str
    teacher_metrics: dict[str, float]
    cache_files: dict[str, str] = field(default_factory=dict)
    cache_hits: dict[str, bool] = field(default_factory=dict)
    teacher_input: TeacherInput | None = None  # the teacher's input contract (None: the student's input)

    def teacher(self) -> nn.Module:
        """A fresh frozen copy of the teacher."""
        model = build_teacher(**self.teacher_architecture)
        model.load_state_dict(self.teacher_state)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model.eval()

    def live_teacher(self, config: ExperimentConfig) -> nn.Module | None:
        """The teacher network when the method trains on its features (else None: logits and
        maps come from the cache), fed the student's batches through its input contract."""
        if not METHODS[config.distill.method].needs_teacher:
            return None
        return student_view(self.teacher(), self.teacher_input)


def prepare(config: ExperimentConfig, progress: bool = True) -> DistillData:
    """Load the data, get the teacher, and read (or compute once) its cached explanations."""
    return prepare_splits(config, load_splits(config.data), progress=progress)


def prepare_splits(config: ExperimentConfig, splits: Splits, progress: bool = True) -> DistillData:
    """``prepare`` on splits already loaded (``ray_teacher.prepare_on_workers`` loads them once to
    find what is missing from the caches, then assembles the bundle here)."""
    teacher = load_or_train_teacher(config, splits, progress=progress)
    inputs = teacher_input(config, splits)
    outputs: dict[str, TeacherOutputs] = {}
    files: dict[str, str] = {}
    hits: dict[str, bool] = {}
    for name in SPLIT_NAMES:
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
            inputs=inputs,
            labels=splits.split(name).labels,
            faithfulness=config.faithfulness.cache_settings(),
        )
        files[name] = str(path)
    teacher_metrics = dict(teacher.metrics)
    for name in ("val", "test"):
        teacher_metrics[f"{name}_degenerate_maps"] = outputs[name].degenerate_maps
        for key, values in (outputs[name].faithfulness or {}).items():  # "deletion_teacher" -> "val_deletion_auc"
            teacher_metrics[f"{name}_{key.replace('_teacher', '_auc', 1)}"] = values.mean().item()
    return DistillData(
        splits=splits,
        teacher_outputs=outputs,
        template_map=outputs["train"].maps.mean(dim=0),
        teacher_architecture=teacher_architecture(config, splits),
        teacher_state={k: v.detach().cpu() for k, v in teacher.model.state_dict().items()},
        teacher_id=teacher.teacher_id,
        teacher_metrics=teacher_metrics,
        cache_files=files,
        cache_hits=hits,
        teacher_input=inputs,
    )
