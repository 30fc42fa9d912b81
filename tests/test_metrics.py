"""Metrics: fidelity extremes, top-k IoU ties, Pareto sorting and hypervolume against brute force."""

import itertools
import math
import random

import pytest
import torch

from xkd_ray.core.metrics import (
    accuracy,
    agreement,
    dominates,
    fidelity,
    hypervolume,
    non_dominated,
    template_fidelity,
    topk_iou,
)


def test_accuracy_and_agreement():
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert agreement(logits, torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])) == pytest.approx(2 / 3)


def test_fidelity_is_one_for_identical_maps_and_near_zero_for_noise():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(200, 16, 16, generator=generator)
    assert fidelity(maps, maps) == pytest.approx(1.0, abs=1e-5)
    noise = torch.rand(200, 16, 16, generator=generator)
    assert abs(fidelity(maps, noise)) < 0.02
    assert fidelity(maps, -maps) == pytest.approx(-1.0, abs=1e-5)


def _pearson_by_hand(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    dx, dy = [x - mean_x for x in xs], [y - mean_y for y in ys]
    return sum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(sum(a * a for a in dx) * sum(b * b for b in dy))


def test_template_fidelity_against_hand_computed_pearson():
    """One template map scored against every teacher map, Pearson per image, then the mean."""
    template = [[1.0, 2.0], [3.0, 4.0]]
    maps = [
        [[4.0, 3.0], [2.0, 1.0]],  # the template reversed: r = -1
        [[1.0, 3.0], [2.0, 4.0]],  # centred dot 4, both norms sqrt(5): r = 0.8
        [[0.0, 1.0], [0.0, 0.0]],  # centred dot -0.5, norms sqrt(5), sqrt(0.75)
    ]
    flat_template = [v for row in template for v in row]
    by_hand = [_pearson_by_hand(flat_template, [v for row in m for v in row]) for m in maps]
    assert by_hand[0] == pytest.approx(-1.0)
    assert by_hand[1] == pytest.approx(0.8)
    assert by_hand[2] == pytest.approx(-0.5 / math.sqrt(5 * 0.75))
    expected = sum(by_hand) / 3
    assert template_fidelity(torch.tensor(template), torch.tensor(maps)) == pytest.approx(expected, abs=1e-6)
    # Each image on its own: the template is compared with every map, not only the first.
    for map_, r in zip(maps, by_hand, strict=True):
        assert template_fidelity(torch.tensor(template), torch.tensor([map_])) == pytest.approx(r, abs=1e-6)


def test_template_fidelity_extremes():
    generator = torch.Generator().manual_seed(0)
    template = torch.rand(6, 6, generator=generator)
    # Every teacher map is the template up to a positive scale and a shift: fidelity 1.
    scales = torch.rand(8, 1, 1, generator=generator) + 0.5
    shifts = torch.randn(8, 1, 1, generator=generator)
    same = template * scales + shifts
    assert template_fidelity(template, same) == pytest.approx(1.0, abs=1e-5)
    # Anti-correlated pixel patterns: negative (exactly -1 for negated copies).
    assert template_fidelity(template, -same) == pytest.approx(-1.0, abs=1e-5)
    # Half the images agree, half are reversed: the per-image correlations cancel out.
    mixed = torch.cat([same[:4], -same[4:]])
    assert template_fidelity(template, mixed) == pytest.approx(0.0, abs=1e-5)
    # A spatially flat template has no defined correlation: 0, never NaN (float32 rounding of
    # 0.3 - mean leaves a ~1e-7 residue, hence approx).
    assert template_fidelity(torch.full((6, 6), 0.3), same) == pytest.approx(0.0, abs=1e-6)
    assert template_fidelity(torch.full((6, 6), 0.5), same) == 0.0


def test_topk_iou_identical_and_disjoint():
    a = torch.zeros(1, 10, 10)
    a[0, 0, :] = torch.arange(1.0, 11.0)
    assert topk_iou(a, a) == pytest.approx(1.0)
    b = torch.zeros(1, 10, 10)
    b[0, 9, :] = torch.arange(1.0, 11.0)
    assert topk_iou(a, b) == pytest.approx(0.0)


def test_topk_iou_breaks_ties_at_random_not_by_index():
    # Two maps with only 2 non-zero cells each (k = 10): topk by index would pick the same 8
    # zero cells for both and report a large overlap; random tie-breaking keeps it near chance.
    a = torch.zeros(200, 10, 10)
    b = torch.zeros(200, 10, 10)
    a[:, 0, 0:2] = 1.0
    b[:, 5, 5:7] = 1.0
    naive_a = torch.topk(a.flatten(1), 10).indices
    naive_b = torch.topk(b.flatten(1), 10).indices
    naive_iou = (
        sum(
            len(set(x.tolist()) & set(y.tolist())) / len(set(x.tolist()) | set(y.tolist()))
            for x, y in zip(naive_a, naive_b, strict=True)
        )
        / 200
    )
    fair = topk_iou(a, b, seed=0)
    assert naive_iou > 0.4
    assert fair < 0.1
    assert topk_iou(a, b, seed=0) == fair  # reproducible with the same seed


def _brute_force_hypervolume(points, reference, grid=24):
    """Count the cells of a grid over [reference, 1]^d that some point dominates (maximised)."""
    dims = len(reference)
    cells = itertools.product(
        *[[reference[k] + (i + 0.5) * (1 - reference[k]) / grid for i in range(grid)] for k in range(dims)]
    )
    covered = sum(1 for cell in cells if any(all(p[k] >= cell[k] for k in range(dims)) for p in points))
    return covered * math.prod((1 - r) / grid for r in reference)


@pytest.mark.parametrize(("seed", "dims"), [(s, d) for s in range(3) for d in (2, 3)])
def test_non_dominated_and_hypervolume_match_brute_force(seed, dims):
    rng = random.Random(seed)
    points = [tuple(round(rng.random(), 2) for _ in range(dims)) for _ in range(20)]
    front = non_dominated(points)
    brute = [
        i for i, p in enumerate(points) if not any(all(q[k] >= p[k] for k in range(dims)) and q != p for q in points)
    ]
    assert front == brute
    assert all(not dominates(points[j], points[i]) for i in front for j in range(len(points)))
    grid = 200 if dims == 2 else 40
    expected = _brute_force_hypervolume(points, (0.0,) * dims, grid)
    assert hypervolume(points, (0.0,) * dims) == pytest.approx(expected, abs=2 * dims / grid)
    # Only the front contributes to the hypervolume.
    assert hypervolume([points[i] for i in front], (0.0,) * dims) == pytest.approx(hypervolume(points, (0.0,) * dims))


def test_minimised_objectives_are_mirrored():
    """(accuracy max, params min): the same front and volume as (accuracy, -params) maximised."""
    points = [(0.9, 5000.0), (0.8, 1000.0), (0.7, 3000.0)]
    directions = ("max", "min")
    assert non_dominated(points, directions) == [0, 1]
    mirrored = [(a, -p) for a, p in points]
    assert hypervolume(points, (0.0, 10000.0), directions) == pytest.approx(hypervolume(mirrored, (0.0, -10000.0)))
    # 0.9 x 5000 (to params 5000) + 0.8 x 9000 (to params 1000) - their 0.8 x 5000 overlap
    assert hypervolume(points, (0.0, 10000.0), directions) == pytest.approx(7700.0)


def test_hypervolume_by_hand():
    assert hypervolume([(1.0, 0.5), (0.5, 1.0)], (0.0, 0.0)) == pytest.approx(0.75)
    assert hypervolume([(0.5, 0.5)], (0.5, 0.0)) == 0.0
