"""Objectives and diagnostics as pure tensor/number functions (no I/O, no models), and the
``METRICS`` registry every table, parquet column and search objective is read from.

Fidelity is reported next to ``fidelity_template`` (a constant map) because a naive head can
score below it (README, "Our formulation": measured pitfalls).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from xkd_ray.core.faithfulness_metrics import FAITHFULNESS_METRICS
from xkd_ray.core.losses import pearson_per_image
from xkd_ray.core.metric_types import (
    CORRELATION,
    COUNT,
    SKILL,
    UNIT,
    Evidence,
    Metric,
)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Top-1 agreement: how often the student predicts what the teacher predicts."""
    return (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean().item()


def fidelity(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation between the two explanations."""
    return pearson_per_image(student_maps, teacher_maps).mean().item()


def template_fidelity(template_map: torch.Tensor, teacher_maps: torch.Tensor) -> float:
    """The bar to beat: one constant map (the mean training teacher map) used for every image."""
    return fidelity(template_map.expand_as(teacher_maps), teacher_maps)


def _random_rank_top_k(maps: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of the k largest cells per map, ties broken uniformly at random.

    ``torch.topk`` breaks ties by index, which makes two sparse maps with many zeros look
    alike (their zero cells are picked in the same order); a random permutation before a
    stable sort removes that bias, reproducibly given the generator.
    """
    flat = maps.flatten(1)
    count, cells = flat.shape
    permutation = torch.stack([torch.randperm(cells, generator=generator) for _ in range(count)])
    shuffled = torch.gather(flat, 1, permutation)
    order = torch.sort(shuffled, dim=1, descending=True, stable=True).indices[:, :k]
    chosen = torch.gather(permutation, 1, order)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask


def topk_iou(student_maps: torch.Tensor, teacher_maps: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> float:
    """Mean IoU of the top ``fraction`` of cells of each pair of maps (ties broken at random)."""
    cells = student_maps[0].numel()
    k = max(1, math.ceil(fraction * cells))
    generator = torch.Generator().manual_seed(seed)
    student_top = _random_rank_top_k(student_maps.float().cpu(), k, generator)
    teacher_top = _random_rank_top_k(teacher_maps.float().cpu(), k, generator)
    intersection = (student_top & teacher_top).sum(dim=1).float()
    union = (student_top | teacher_top).sum(dim=1).float()
    return (intersection / union).mean().item()


def _signed(point: Sequence[float], directions: Sequence[str] | None) -> list[float]:
    """The point with every objective turned into one to maximise (a minimised one negated)."""
    if directions is None:
        return list(point)
    return [v if d == "max" else -v for v, d in zip(point, directions, strict=True)]


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str] | None = None) -> bool:
    """a dominates b when it is no worse in every objective and better in one (``directions``:
    "max"/"min" per objective, all maximised when omitted)."""
    x, y = _signed(a, directions), _signed(b, directions)
    return all(p >= q for p, q in zip(x, y, strict=True)) and any(p > q for p, q in zip(x, y, strict=True))


def non_dominated(points: Sequence[Sequence[float]], directions: Sequence[str] | None = None) -> list[int]:
    """Indices of the points no other point dominates (the first front of ``non_dominated_ranks``);
    duplicates all kept."""
    if not points:
        return []
    directions = directions or ["max"] * len(points[0])
    return [i for i, rank in enumerate(non_dominated_ranks(points, directions)) if rank == 0]


Point = Sequence[float | None]


def _losses(points: Sequence[Point], directions: Sequence[str]) -> np.ndarray:
    """Rows to minimise: "max" columns negated; NaN, None and ±inf become +inf (the worst value)."""
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    raw = np.array([[math.nan if v is None else float(v) for v in p] for p in points], dtype=float)
    raw = raw.reshape(len(points), len(directions)) * sign
    return np.where(np.isfinite(raw), raw, np.inf)


def non_dominated_ranks(points: Sequence[Point], directions: Sequence[str]) -> list[int]:
    """Front index of each point (0 = Pareto front). A point with any missing/non-finite objective ranks
    after every complete point: a NaN usually means a diverged run, which should not survive on one good metric."""
    loss = _losses(points, directions)
    le, lt = loss[:, None, :] <= loss[None, :, :], loss[:, None, :] < loss[None, :, :]
    dominates = le.all(axis=2) & lt.any(axis=2)  # [j, i]: j dominates i; one O(n^2 m) pass
    complete = np.isfinite(loss).all(axis=1)
    ranks, rank = np.zeros(len(loss), dtype=int), 0
    for group in (complete, ~complete):
        remaining = group.copy()
        while remaining.any():
            front = remaining & ~dominates[remaining].any(axis=0)
            ranks[front] = rank
            remaining &= ~front
            rank += 1
    return ranks.tolist()


def crowding_distances(
    points: Sequence[Point], directions: Sequence[str], ranks: Sequence[int] | None = None
) -> list[float]:
    """NSGA-II crowding distance of each point within its own front (the tie-break score; larger wins).

    Chosen over hypervolume contribution (needs a reference point) and the epsilon-net (needs an epsilon):
    it is scale-free per objective and gives both ends of a front infinite distance, so extremes survive."""
    loss = _losses(points, directions)
    ranks = np.array(non_dominated_ranks(points, directions) if ranks is None else ranks)
    dist = np.zeros(len(loss))
    for r in set(ranks.tolist()):
        idx = np.flatnonzero(ranks == r)
        if len(idx) <= 2:
            dist[idx] = np.inf
            continue
        for col in loss[idx].T:
            order = np.argsort(col, kind="stable")
            finite = col[np.isfinite(col)]
            span = float(finite.max() - finite.min()) if finite.size else 0.0
            gaps = (col[order[2:]] - col[order[:-2]]) / span if span > 0 else np.zeros(len(idx) - 2)
            dist[idx[order[1:-1]]] += np.nan_to_num(gaps, nan=0.0, posinf=0.0)  # inf-inf/inf neighbours: no info
            dist[idx[order[[0, -1]]]] = np.inf
    return dist.tolist()


def hypervolume(
    points: Sequence[Sequence[float]], reference: Sequence[float], directions: Sequence[str] | None = None
) -> float:
    """The volume dominated by the points and bounded by ``reference`` (the worst values that
    count), in any number of objectives; points not better than the reference in every
    objective add nothing. Computed by moocore (exact algorithms, maintained; ours was 2-D only)."""
    import moocore
    import numpy as np

    signed_reference = _signed(reference, directions)
    signed = (_signed(p, directions) for p in points)
    kept = [s for s in signed if all(v > r for v, r in zip(s, signed_reference, strict=True))]
    if not kept:
        return 0.0
    return float(moocore.hypervolume(np.asarray(kept, dtype=float), ref=signed_reference, maximise=True))


# ----------------------------------------------------------------------------- the registry


def skill(score: float, template_score: float) -> float:
    """Skill over the constant map: (f - f_template) / (1 - f_template). 0 = as good as the mean
    teacher map used for every image, 1 = perfect, < 0 = worse than that constant."""
    return (score - template_score) / max(1.0 - template_score, 1e-12)


def _head_honesty(e: Evidence) -> float | None:
    """Does the head show what the student itself uses? Pearson r of the head's map and the
    student's own post-hoc map (same explainer family as the teacher's maps), mean per image."""
    return None if e.head_maps is None else fidelity(e.head_maps, e.posthoc_maps)


METRICS: dict[str, Metric] = {
    "accuracy": Metric(lambda e: accuracy(e.logits, e.labels), "top-1 accuracy against the labels", bounds=UNIT),
    "agreement": Metric(
        lambda e: agreement(e.logits, e.teacher_logits), "top-1 agreement with the teacher", bounds=UNIT
    ),
    "fidelity": Metric(
        lambda e: fidelity(e.explanation, e.teacher_maps),
        "mean Pearson r between the student's explanation (head map, else post-hoc) and the teacher's map",
        bounds=CORRELATION,
    ),
    "fidelity_posthoc": Metric(
        lambda e: fidelity(e.posthoc_maps, e.teacher_maps),
        "mean Pearson r between captum on the student and the teacher's map",
        bounds=CORRELATION,
    ),
    "fidelity_template": Metric(
        lambda e: template_fidelity(e.template_map, e.teacher_maps),
        "fidelity of one constant map (the mean training teacher map): the bar to beat",
        bounds=CORRELATION,
    ),
    "topk_iou": Metric(
        lambda e: topk_iou(e.explanation, e.teacher_maps, seed=e.seed),
        "IoU of the top 10% cells of the student's explanation and the teacher's map",
        bounds=UNIT,
    ),
    "degenerate_maps": Metric(
        lambda e: e.degenerate_maps,
        "teacher Grad-CAM maps that were all zero (fell back to |raw CAM|)",
        "min",
        bounds=COUNT,
    ),
    "fidelity_skill": Metric(
        lambda e: skill(fidelity(e.explanation, e.teacher_maps), template_fidelity(e.template_map, e.teacher_maps)),
        "skill of fidelity over the constant map: (f - f_template) / (1 - f_template); <= 0: no better than it",
        bounds=SKILL,
    ),
    "fidelity_posthoc_skill": Metric(
        lambda e: skill(fidelity(e.posthoc_maps, e.teacher_maps), template_fidelity(e.template_map, e.teacher_maps)),
        "skill of fidelity_posthoc over the constant map",
        bounds=SKILL,
    ),
    "head_honesty": Metric(
        _head_honesty, "mean Pearson r between the head's map and the student's own post-hoc map", bounds=CORRELATION
    ),
    **FAITHFULNESS_METRICS,
    "params": Metric(lambda e: (e.cost or {}).get("params"), "the student's parameter count", "min", bounds=COUNT),
    "latency_ms": Metric(
        lambda e: (e.cost or {}).get("latency_ms"),
        "inference time per image at batch size 1, ms (median of timed runs after warm-up, on the evaluating device)",
        "min",
        exact=False,
        bounds=COUNT,
    ),
    "latency_iqr_ms": Metric(
        lambda e: (e.cost or {}).get("latency_iqr_ms"),
        "spread of latency_ms: interquartile range of the timed runs, ms",
        "min",
        exact=False,
        bounds=COUNT,
    ),
}


def compute_metrics(evidence: Evidence) -> dict[str, float | int]:
    """Every registered metric on one split."""
    return {name: metric.compute(evidence) for name, metric in METRICS.items()}


def metrics_of(
    predictions: Any,  # core.distill.StudentPredictions: logits, head_maps, posthoc_maps, cost
    labels: torch.Tensor,
    outputs: Any,  # core.explain.TeacherOutputs: logits, maps, degenerate_maps
    template_map: torch.Tensor,
    seed: int,
    diagnostics: dict[str, torch.Tensor] | None,
) -> dict[str, float]:
    """Every registered metric from a student's predictions and the teacher's outputs on the same images."""
    return compute_metrics(
        Evidence(
            logits=predictions.logits,
            labels=labels,
            head_maps=predictions.head_maps,
            posthoc_maps=predictions.posthoc_maps,
            teacher_logits=outputs.logits,
            teacher_maps=outputs.maps,
            template_map=template_map,
            degenerate_maps=outputs.degenerate_maps,
            seed=seed,
            diagnostics=diagnostics,
            cost=predictions.cost,
        )
    )
