"""Faithfulness you can trust: the stratified subset, ROAD's noisy linear imputation and curves,
MPRT, and the rule that says when a curve cannot tell real maps from random ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xkd_ray.core.diagnostics import student_diagnostics
from xkd_ray.core.faithfulness import (
    cascade_layers,
    curve_auc,
    faithfulness_subset,
    shifted_maps,
    spearman_per_image,
    ssim_per_image,
    standard_error,
)
from xkd_ray.core.faithfulness_metrics import informative, informative_in
from xkd_ray.core.metrics import METRICS
from xkd_ray.core.models import StudentNet
from xkd_ray.core.road import noisy_linear_impute, road_curves


class OneBlockModel(nn.Module):
    """Decides by the mean of the top-left 4x4 block of channel 0 only (class 0 when it is bright)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = x[:, 0, :4, :4].mean(dim=(1, 2))
        return torch.stack([evidence, -evidence], dim=1)


def test_noisy_imputation_of_a_removed_centre_is_the_weighted_neighbour_mean():
    image = np.arange(9, dtype=np.float64).reshape(1, 3, 3) ** 2  # not linear: the mean is not the middle value
    removed = np.zeros((3, 3), dtype=bool)
    removed[1, 1] = True
    weights = np.array([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])
    out = noisy_linear_impute(image, removed, noise=0.0)
    assert out[0, 1, 1] == pytest.approx((weights * image[0]).sum())  # the weights already sum to 1
    np.testing.assert_array_equal(out[0][~removed], image[0][~removed])  # known pixels stay fixed
    # A corner has 3 neighbours: the weights are renormalised over them.
    corner = np.zeros((3, 3), dtype=bool)
    corner[0, 0] = True
    expected = (image[0, 0, 1] / 6 + image[0, 1, 0] / 6 + image[0, 1, 1] / 12) / (1 / 6 + 1 / 6 + 1 / 12)
    assert noisy_linear_impute(image, corner, noise=0.0)[0, 0, 0] == pytest.approx(expected)
    # Two removed neighbours are solved jointly: each is the weighted mean of the other and the known ones.
    pair = np.zeros((3, 3), dtype=bool)
    pair[1, 1] = pair[1, 2] = True
    solved = noisy_linear_impute(image, pair, noise=0.0)[0]
    for y, x in ((1, 1), (1, 2)):
        neighbours = [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
        inside = [(a, b) for a, b in neighbours if 0 <= a < 3 and 0 <= b < 3]
        w = np.array([1 / 6 if a == y or b == x else 1 / 12 for a, b in inside])
        assert solved[y, x] == pytest.approx((w * np.array([solved[a, b] for a, b in inside])).sum() / w.sum())


def test_imputation_noise_touches_only_the_removed_pixels_and_every_channel_is_solved():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3, 6, 6))
    removed = rng.random((6, 6)) < 0.5
    clean = noisy_linear_impute(image, removed, noise=0.0)
    noisy = noisy_linear_impute(image, removed, noise=0.01, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(noisy[:, ~removed], image[:, ~removed])
    difference = noisy[:, removed] - clean[:, removed]
    assert 0 < np.abs(difference).max() < 0.06 and np.std(difference) == pytest.approx(0.01, rel=0.5)
    assert not np.allclose(clean[0][removed], clean[1][removed])  # per-channel solutions
    assert np.all(noisy_linear_impute(image, np.ones((6, 6), bool), noise=0.0) == 0)  # nothing left: the mean


def test_road_finds_the_block_the_model_reads():
    torch.manual_seed(0)
    images = torch.randn(24, 1, 16, 16) * 0.3
    images[:, 0, :4, :4] = 1.5
    right = torch.zeros(24, 16, 16)
    right[:, :4, :4] = 1.0
    reverse = 1.0 - right
    random_maps = torch.rand(24, 16, 16)
    aucs = {
        name: {order: curve_auc(c).mean().item() for order, c in road_curves(OneBlockModel(), images, maps).items()}
        for name, maps in (("right", right), ("reverse", reverse), ("random", random_maps))
    }
    # MoRF: removing the block first drops the prediction at once; LeRF: keeping it keeps it.
    assert aucs["right"]["morf"] < aucs["random"]["morf"] - 0.1
    assert aucs["right"]["morf"] < aucs["reverse"]["morf"] - 0.1
    assert aucs["right"]["lerf"] > aucs["random"]["lerf"]  # a random order also keeps much of a bright block
    assert aucs["right"]["lerf"] > aucs["reverse"]["lerf"] + 0.1
    # The imputed block carries no evidence: chance (0.5) on average once it is removed (the
    # block is filled from the noisy pixels around it, so each image lands near, not at, 0.5).
    curves = road_curves(OneBlockModel(), images, right, steps=4)["morf"]
    assert curves[:, 0].min() > 0.9 and abs(curves[:, 1:].mean().item() - 0.5) < 0.05
    # Shards give what the whole set gives: every draw is seeded by the image's index.
    whole = road_curves(OneBlockModel(), images, random_maps)["morf"]
    part = road_curves(OneBlockModel(), images[10:], random_maps[10:], ids=torch.arange(10, 24))["morf"]
    torch.testing.assert_close(whole[10:], part)


def test_shifted_maps_keep_each_maps_values_and_move_them_by_a_quarter_to_three_quarters():
    maps = torch.zeros(30, 16, 16)
    rows, cols = torch.randint(0, 16, (30,)), torch.randint(0, 16, (30,))
    maps[torch.arange(30), rows, cols] = 1.0  # one hot pixel per map: its move is the offset
    maps += torch.rand(30, 16, 16) * 0.1
    ids = torch.arange(100, 130)
    shifted = shifted_maps(maps, ids, seed=3)
    torch.testing.assert_close(shifted.flatten(1).sort(1).values, maps.flatten(1).sort(1).values)
    hot = shifted.flatten(1).argmax(1)
    for dy, dx in zip(((hot // 16 - rows) % 16).tolist(), ((hot % 16 - cols) % 16).tolist(), strict=True):
        assert 4 <= dy <= 12 and 4 <= dx <= 12, (dy, dx)
    torch.testing.assert_close(shifted_maps(maps[10:], ids[10:], seed=3), shifted[10:])  # shards agree
    assert not torch.equal(shifted_maps(maps, ids, seed=4), shifted)


def test_road_tells_a_smooth_map_on_the_evidence_from_the_same_map_shifted_elsewhere():
    """A smooth map on the block the model reads beats the same map shifted elsewhere under both
    ROAD orders: the shifted control removes contiguous regions too, as smooth maps do."""
    torch.manual_seed(0)
    images = torch.randn(24, 1, 16, 16) * 0.3
    images[:, 0, :4, :4] = 1.5
    right = torch.zeros(24, 16, 16)
    right[:, :6, :6] = 1.0
    right = torch.nn.functional.avg_pool2d(right[:, None], 5, stride=1, padding=2)[:, 0]  # smooth, like Grad-CAM
    ids = torch.arange(24)
    aucs = {
        name: {order: curve_auc(c).mean().item() for order, c in road_curves(OneBlockModel(), images, maps).items()}
        for name, maps in (
            ("right", right),
            ("shifted", shifted_maps(right, ids, 0)),
            ("random", torch.rand(24, 16, 16)),
        )
    }
    assert aucs["right"]["morf"] < aucs["shifted"]["morf"] - 0.1, aucs
    assert aucs["right"]["lerf"] > aucs["shifted"]["lerf"] + 0.1, aucs


def _posthoc_saliency(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    images = images.clone().requires_grad_(True)
    model(images).gather(1, targets[:, None]).sum().backward()
    return images.grad.abs().sum(dim=1)


def test_mprt_is_one_for_a_map_that_ignores_the_model_and_falls_for_one_that_reads_it():
    torch.manual_seed(0)
    student = StudentNet(1, 4, width=4).eval()
    assert cascade_layers(student) == ["classifier", "stage3", "stage2", "stage1"]
    images = torch.randn(6, 1, 16, 16)
    targets = torch.zeros(6, dtype=torch.long)
    ids = torch.arange(6)

    def input_map(model, some, _targets):  # the input's magnitude: no model in it at all
        return some.abs().sum(dim=1)

    common = {"seed": 0, "road": "off"}
    ignoring = student_diagnostics(
        student, images, targets, None, input_map(None, images, None), ids, input_map, **common
    )
    assert ignoring["mprt_spearman_posthoc"].min().item() == pytest.approx(1.0)
    assert ignoring["mprt_ssim_posthoc"].min().item() == pytest.approx(1.0)
    reading = student_diagnostics(
        student, images, targets, None, _posthoc_saliency(student, images, targets), ids, _posthoc_saliency, **common
    )
    assert reading["mprt_spearman_posthoc"].mean().item() < 0.9
    assert reading["mprt_ssim_posthoc"].mean().item() < 0.9


def test_rank_and_structure_similarities_by_hand():
    a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    assert spearman_per_image(a, a**3).item() == pytest.approx(1.0)  # monotone: same ranks
    assert spearman_per_image(a, -a).item() == pytest.approx(-1.0)
    maps = torch.rand(3, 9, 9)
    assert torch.allclose(ssim_per_image(maps, maps), torch.ones(3))
    assert (ssim_per_image(maps, torch.rand(3, 9, 9)) < 0.5).all()


def test_the_subset_is_stratified_and_the_same_for_the_same_seed():
    rng = np.random.default_rng(3)
    labels = rng.choice(10, size=1000, p=np.r_[0.3, np.full(9, 0.7 / 9)])
    subset = faithfulness_subset(labels, 200, seed=7)
    assert len(subset) == 200 and len(set(subset.tolist())) == 200 and np.all(np.diff(subset) > 0)
    counts = np.bincount(labels, minlength=10)
    taken = np.bincount(labels[subset], minlength=10)
    assert np.all(np.abs(taken - counts * 200 / 1000) < 1)  # every class in proportion, to within rounding
    np.testing.assert_array_equal(subset, faithfulness_subset(torch.as_tensor(labels), 200, seed=7))
    assert not np.array_equal(subset, faithfulness_subset(labels, 200, seed=8))
    np.testing.assert_array_equal(
        faithfulness_subset(labels[:150], 200, seed=7), np.arange(150)
    )  # all of a small split


def test_informative_needs_a_margin_beyond_noise():
    assert informative(0.2, 0.5, 0.02, "min")  # lower MoRF AUC than random, by 0.3 >> 2 SE
    assert not informative(0.48, 0.5, 0.001, "min")  # below the 0.05 margin
    assert not informative(0.3, 0.5, 0.2, "min")  # within 2 standard errors
    assert informative(0.8, 0.5, 0.02, "max") and not informative(0.5, 0.8, 0.02, "max")
    assert not informative(float("nan"), 0.5, 0.01, "min")
    row = {"val_road_morf_auc_teacher": 0.2, "val_road_morf_auc_teacher_rand": 0.6}
    assert informative_in(row, "road_morf", "val_") is None  # no standard errors: nothing to decide from
    row |= {"val_road_morf_se_teacher": 0.01, "val_road_morf_se_teacher_rand": 0.01}
    assert informative_in(row, "road_morf", "val_") is True  # no shifted control measured: random maps
    row |= {"val_road_morf_auc_teacher_shift": 0.22, "val_road_morf_se_teacher_shift": 0.01}
    assert informative_in(row, "road_morf", "val_") is False  # the shifted control decides when measured
    assert (
        standard_error(torch.tensor([1.0, 3.0])) == pytest.approx(1.0) and standard_error(torch.tensor([1.0])) is None
    )


def test_the_registry_holds_road_and_mprt_with_their_directions():
    for whose in ("teacher", "teacher_rand", "teacher_shift", "head", "posthoc", "random", "shifted"):
        assert METRICS[f"road_morf_auc_{whose}"].direction == "min"
        assert METRICS[f"road_lerf_auc_{whose}"].direction == "max"
        assert METRICS[f"road_morf_se_{whose}"].error_of == f"road_morf_auc_{whose}"
    assert METRICS["mprt_spearman_posthoc"].direction == "min" and METRICS["mprt_ssim_posthoc"].direction == "min"
    assert not METRICS["latency_ms"].exact and "median" in METRICS["latency_ms"].description


def test_tables_say_not_informative_where_the_teacher_does_not_beat_random():
    import io

    from rich.console import Console

    from xkd_ray.pareto.display import NOT_INFORMATIVE_CELL, front_table, judged_cell

    def row(trial: str, teacher: float) -> dict:
        values = {"road_morf_auc_teacher": teacher, "road_morf_auc_teacher_rand": 0.6, "road_morf_auc_head": 0.3}
        values |= {"road_morf_se_teacher": 0.01, "road_morf_se_teacher_rand": 0.01, "accuracy": 0.9}
        return {
            "trial_id": trial,
            "method": "xd",
            **{f"{s}_{k}": v for s in ("val", "test") for k, v in values.items()},
        }

    separating, blind = row("a", 0.2), row("b", 0.59)
    assert judged_cell("road_morf_auc_head", 0.3, separating, "val_") == "0.300"
    assert judged_cell("road_morf_auc_head", 0.3, blind, "val_") == NOT_INFORMATIVE_CELL
    assert judged_cell("accuracy", 0.9, blind, "val_") == "0.900"  # only the perturbation curves are judged
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(front_table([separating, blind], "front", ("accuracy", "road_morf_auc_head")))
    text = console.export_text()
    assert "not informative here" in text and text.count(NOT_INFORMATIVE_CELL) >= 2
