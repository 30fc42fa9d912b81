"""Is an explanation the model's real reason? The per-image faithfulness measurements of a
student (``student_diagnostics``) and of the teacher (``teacher_diagnostics``) on the
faithfulness subset, keyed as ``Evidence.diagnostics`` reads them (docs/FAITHFULNESS.md), and
its cost (``student_cost``: parameters, latency).

Every random draw (random maps, tie order, ROAD noise) is seeded per image by its index in the
split, so a split measured in shards gives what the whole split would.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from xkd_ray.core.faithfulness import (
    cascade_layers,
    cascading_copies,
    curve_auc,
    perturbation_curves,
    random_maps,
    randomised_copy,
    shifted_maps,
    spearman_per_image,
    ssim_per_image,
)
from xkd_ray.core.losses import pearson_per_image
from xkd_ray.core.models import StudentNet, parameter_count
from xkd_ray.core.road import road_curves

Model = Callable[[torch.Tensor], torch.Tensor]


def curve_diagnostics(
    model: Model,
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    ids: torch.Tensor,
    *,
    seed: int,
    road: bool,
    road_steps: int,
) -> dict[str, torch.Tensor]:
    """Deletion / insertion AUCs and (``road``) ROAD MoRF / LeRF AUCs of ``model`` with each of
    ``maps`` (whose -> [N, H, W]), per image: keys like "deletion_head", "road_lerf_random"."""
    found: dict[str, torch.Tensor] = {}
    for whose, whose_maps in maps.items():
        deletion, insertion = perturbation_curves(model, images, whose_maps, seed=seed, ids=ids)
        found[f"deletion_{whose}"], found[f"insertion_{whose}"] = curve_auc(deletion).cpu(), curve_auc(insertion).cpu()
        if road:
            for order, curves in road_curves(model, images, whose_maps, steps=road_steps, seed=seed, ids=ids).items():
                found[f"road_{order}_{whose}"] = curve_auc(curves)
    return found


def teacher_diagnostics(
    teacher: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    ids: torch.Tensor,
    *,
    seed: int,
    road: bool,
    road_steps: int,
) -> dict[str, torch.Tensor]:
    """The teacher with its own maps ("..._teacher"), with random maps ("..._teacher_rand") and
    with its maps shifted elsewhere ("..._teacher_shift", the control ``faithfulness_metrics.
    informative`` reads), on the subset images given."""
    device = next(teacher.parameters()).device
    chosen = {
        "teacher": maps,
        "teacher_rand": random_maps(ids, *images.shape[-2:], seed),
        "teacher_shift": shifted_maps(maps, ids, seed),
    }
    return curve_diagnostics(teacher, images.to(device), chosen, ids, seed=seed, road=road, road_steps=road_steps)


def student_diagnostics(
    student: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    head_maps: torch.Tensor | None,
    posthoc_maps: torch.Tensor,
    ids: torch.Tensor,
    posthoc: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    seed: int,
    road: bool = True,
    road_steps: int = 5,
    mprt: bool = True,
) -> dict[str, torch.Tensor]:
    """Deletion / insertion (and ROAD) AUCs of the student's head map, post-hoc map, random maps
    and its post-hoc maps shifted elsewhere (the two controls); the randomisation check
    (everything but the head re-initialised, Adebayo et al. 2018); and with ``mprt`` the
    cascading randomisation of the post-hoc map: the student's layers re-initialised from the
    top one by one, the map after each step compared with the original by Spearman rank
    correlation and SSIM, the mean over the steps. ``posthoc(model, images, targets)`` makes
    post-hoc maps (the explainer the student is evaluated with)."""
    device = next(student.parameters()).device
    maps = {
        "posthoc": posthoc_maps,
        "random": random_maps(ids, *images.shape[-2:], seed),
        "shifted": shifted_maps(posthoc_maps, ids, seed),
    }
    if head_maps is not None:
        maps["head"] = head_maps
    found = curve_diagnostics(student, images.to(device), maps, ids, seed=seed, road=road, road_steps=road_steps)
    randomised = randomised_copy(student, keep=lambda name: name.startswith("head"), seed=seed)
    found["randomisation_posthoc"] = pearson_per_image(posthoc_maps, posthoc(randomised, images, targets))
    if head_maps is not None:
        with torch.no_grad():
            randomised_head = randomised(images.to(device), return_all=True).maps.float().cpu()
        found["randomisation_head"] = pearson_per_image(head_maps, randomised_head)
    if mprt:
        steps = [posthoc(copy, images, targets) for copy in cascading_copies(student, cascade_layers(student), seed)]
        if steps:
            found["mprt_spearman_posthoc"] = torch.stack([spearman_per_image(posthoc_maps, s) for s in steps]).mean(0)
            found["mprt_ssim_posthoc"] = torch.stack([ssim_per_image(posthoc_maps, s) for s in steps]).mean(0)
    return found


LATENCY_REPEATS = 20
LATENCY_WARMUP = 3


def student_cost(student: StudentNet, image: torch.Tensor, repeats: int = LATENCY_REPEATS) -> dict[str, float]:
    """Parameter count and per-image latency at batch size 1: the median of ``repeats`` timed
    forwards after ``LATENCY_WARMUP`` untimed ones (first calls pay for allocation and kernel
    selection), with the interquartile range of the timed runs as its spread. The median, not
    the minimum: trials train side by side on the same cores, and the median is what a caller
    sees typically while staying robust to the odd run another process disturbed."""
    device = next(student.parameters()).device
    sample = image[None].to(device)
    times = []
    with torch.no_grad():
        for index in range(repeats + LATENCY_WARMUP):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            student(sample)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= LATENCY_WARMUP:
                times.append(time.perf_counter() - started)
    low, median, high = np.percentile(np.asarray(times) * 1000.0, [25, 50, 75])
    return {"params": float(parameter_count(student)), "latency_ms": float(median), "latency_iqr_ms": float(high - low)}
