"""The registry's types: the ``Evidence`` a split's metrics are computed from, a ``Metric`` entry,
and the value ranges entries declare (``xkd_ray.core.metrics`` re-exports them)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class Evidence:
    """What one split's metrics are computed from: the student's outputs next to the teacher's.

    ``explanation`` is the student's explanation at inference: its head's map when it has a
    head, else captum on the student (``posthoc_maps``) for the teacher's predicted class.
    """

    logits: torch.Tensor  # [N, classes]
    labels: torch.Tensor  # [N]
    head_maps: torch.Tensor | None  # [N, H, W], None for students without a head
    posthoc_maps: torch.Tensor  # [N, H, W]
    teacher_logits: torch.Tensor  # [N, classes]
    teacher_maps: torch.Tensor  # [N, H, W]
    template_map: torch.Tensor  # [H, W], mean training teacher map
    degenerate_maps: int  # teacher maps that fell back to |raw CAM|
    seed: int = 0  # tie-breaking in top-k IoU
    # Per-image diagnostics measured on the models themselves (xkd_ray.core.diagnostics) on the
    # faithfulness subset, when the evaluation asked for them: e.g. "deletion_head",
    # "road_morf_posthoc", "randomisation_head", "mprt_ssim_posthoc", and the teacher's own
    # "deletion_teacher" / "road_lerf_teacher" / "road_morf_teacher_rand".
    diagnostics: dict[str, torch.Tensor] | None = None
    # The student's size and speed, measured on the model (xkd_ray.core.diagnostics.student_cost):
    # "params" (count) and "latency_ms" (per image at batch size 1).
    cost: dict[str, float] | None = None

    @property
    def explanation(self) -> torch.Tensor:
        return self.head_maps if self.head_maps is not None else self.posthoc_maps


@dataclass(frozen=True)
class Metric:
    """One column of every metrics table: how it is computed and which way is better."""

    compute: Callable[[Evidence], float | int | None]  # None: not measured for this student
    description: str
    direction: Literal["max", "min"] = "max"
    # False for a wall-clock measurement: the same student gives a different value on each run,
    # so reproducibility checks compare only the exact metrics.
    exact: bool = True
    # The values the metric can take: a registry file holding one outside them is corrupt or
    # crafted, and is refused when read (xkd_ray.pareto.front) rather than ranked.
    bounds: tuple[float, float] = (-math.inf, math.inf)
    # The name of the metric this one is the standard error of (tables show them side by side).
    error_of: str | None = None


UNIT = (0.0, 1.0)  # a fraction, an IoU, an area under a probability curve
CORRELATION = (-1.0, 1.0)  # a Pearson r
SKILL = (-math.inf, 1.0)  # 1 = perfect, unbounded below
COUNT = (0.0, math.inf)
