"""Is an explanation the student's real reason? The math behind e2KD, skill, deletion /
insertion and the randomisation check, each against a value known by construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xkd_ray.core.faithfulness import curve_auc, perturbation_curves, randomised_copy
from xkd_ray.core.losses import differentiable_gradcam, distillation_loss, pearson_per_image
from xkd_ray.core.metrics import METRICS, Evidence, compute_metrics, skill
from xkd_ray.core.models import StudentNet


def _e2kd_term(student_cams: torch.Tensor, teacher_maps: torch.Tensor, kind: str = "cosine") -> float:
    logits = torch.zeros(len(student_cams), 3)
    parts = distillation_loss(
        logits, torch.zeros(len(student_cams), dtype=torch.long), None, temperature=1.0, alpha=0.0,
        e2kd_weight=2.0, student_cams=student_cams, teacher_maps=teacher_maps, e2kd_kind=kind,
    )  # fmt: skip
    assert parts["total"].item() == pytest.approx(parts["ce"].item() + 2.0 * parts["e2kd"].item())
    return parts["e2kd"].item()


def test_e2kd_term_by_hand():
    student = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # cos = 1 / (1 * sqrt(2)); Pearson r of (1,0,0,0) and (1,1,0,0) = 1/sqrt(3)
    assert _e2kd_term(student, teacher) == pytest.approx(1 - 1 / math.sqrt(2))
    assert _e2kd_term(student, teacher, "pearson") == pytest.approx(1 - 1 / math.sqrt(3))
    assert _e2kd_term(teacher * 7.0, teacher) == pytest.approx(0.0, abs=1e-6)  # scale-invariant


def test_differentiable_gradcam_by_hand():
    """score = sum(A * K): dscore/dA = K, channel weights = mean_hw K_c, CAM = ReLU(sum_c w_c A_c)."""
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]], requires_grad=True)
    kernel = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[-4.0, 0.0], [0.0, 0.0]]])
    score = (features * kernel).sum(dim=(1, 2, 3))
    cam = differentiable_gradcam(features, score, (2, 2))
    # w = (1, -1): CAM = ReLU(A_0 - A_1) = [[1, 1], [2, 4]]
    assert torch.allclose(cam, torch.tensor([[[1.0, 1.0], [2.0, 4.0]]]))


def test_e2kd_term_alone_trains_the_last_conv_block():
    torch.manual_seed(0)
    student = StudentNet(1, 10, width=8)
    images = torch.randn(4, 1, 16, 16)
    teacher_maps = torch.rand(4, 16, 16)
    output = student(images, return_all=True)
    targets = torch.tensor([1, 2, 3, 4])
    cams = differentiable_gradcam(output.features[-1], output.logits.gather(1, targets[:, None])[:, 0], (16, 16))
    parts = distillation_loss(
        output.logits, targets, None, temperature=1.0, alpha=0.0, e2kd_weight=1.0,
        student_cams=cams, teacher_maps=teacher_maps,
    )  # fmt: skip
    parts["e2kd"].backward()
    weight = student.stage3[1][0].weight  # the last conv block's convolution
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert parts["total"].item() == pytest.approx(parts["ce"].item() + parts["e2kd"].item(), rel=1e-5)


class OneBlockModel(nn.Module):
    """Decides by the mean of the top-left 4x4 block of channel 0 only (class 0 when it is bright)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = x[:, 0, :4, :4].mean(dim=(1, 2))  # unsaturated: a half-revealed block gives half the logit
        return torch.stack([evidence, -evidence], dim=1)


def test_deletion_and_insertion_find_the_block_the_model_uses():
    torch.manual_seed(0)
    images = torch.randn(32, 1, 16, 16) * 0.3
    images[:, 0, :4, :4] = 1.5
    right = torch.zeros(32, 16, 16)
    right[:, :4, :4] = 1.0
    random_maps = torch.rand(32, 16, 16)
    deletion_right, insertion_right = (curve_auc(c) for c in perturbation_curves(OneBlockModel(), images, right))
    deletion_random, insertion_random = (
        curve_auc(c) for c in perturbation_curves(OneBlockModel(), images, random_maps)
    )
    assert deletion_right.mean() < deletion_random.mean() - 0.2
    assert insertion_right.mean() > insertion_random.mean() + 0.1
    # Removing the block first drops the prediction to chance (0.5) after the first step.
    curves = perturbation_curves(OneBlockModel(), images, right, steps=16)[0]
    assert torch.allclose(curves[:, 1:], torch.full_like(curves[:, 1:], 0.5), atol=1e-6)


def _evidence(explanation: torch.Tensor, teacher_maps: torch.Tensor, template: torch.Tensor) -> Evidence:
    count = len(teacher_maps)
    logits = torch.eye(3)[torch.arange(count) % 3]
    return Evidence(
        logits=logits, labels=torch.arange(count) % 3, head_maps=explanation, posthoc_maps=explanation,
        teacher_logits=logits, teacher_maps=teacher_maps, template_map=template, degenerate_maps=0,
    )  # fmt: skip


def test_skill_is_zero_for_the_template_and_one_for_the_teachers_own_maps():
    torch.manual_seed(0)
    teacher_maps = torch.rand(12, 6, 6)
    template = teacher_maps.mean(dim=0)
    own = compute_metrics(_evidence(teacher_maps, teacher_maps, template))
    constant = compute_metrics(_evidence(template.expand_as(teacher_maps).clone(), teacher_maps, template))
    assert own["fidelity_skill"] == pytest.approx(1.0) and own["fidelity_posthoc_skill"] == pytest.approx(1.0)
    assert constant["fidelity_skill"] == pytest.approx(0.0, abs=1e-6)
    assert skill(0.5, 0.8) == pytest.approx(-1.5)  # worse than the constant map is negative
    assert own["head_honesty"] == pytest.approx(1.0)
    # Faithfulness metrics are not measured without diagnostics: None, never a made-up number.
    assert own["deletion_auc_head"] is None and METRICS["deletion_auc_head"].direction == "min"


def test_randomisation_check_is_one_for_a_map_that_ignores_the_classifier():
    torch.manual_seed(0)
    student = StudentNet(1, 10, width=8, ae_depth=2).eval()
    images = torch.randn(6, 1, 16, 16)
    randomised = randomised_copy(student, keep=lambda name: name.startswith("head"), seed=1)
    with torch.no_grad():
        before, after = student(images, return_all=True), randomised(images, return_all=True)
    assert pearson_per_image(before.maps, after.maps).min().item() == pytest.approx(1.0)
    assert not torch.allclose(before.logits, after.logits)  # the classifier did change
