"""Each loss against a value computed by hand on a tiny tensor."""

import math

import pytest
import torch
import torch.nn.functional as F

from xkd_ray.core.losses import (
    attention_transfer_loss,
    cross_entropy,
    distillation_loss,
    explanation_loss,
    kd_loss,
    pearson_per_image,
)


def test_cross_entropy_by_hand():
    # -log(e^2 / (e^2 + 1)) = log(1 + e^-2)
    assert cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(
        math.log(1 + math.exp(-2))
    )


def test_kd_loss_by_hand_and_temperature_squared_scaling():
    # teacher softmax [0.75, 0.25], student [0.5, 0.5]: KL = 0.75 ln 1.5 + 0.25 ln 0.5
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    student = torch.zeros(1, 2)
    assert kd_loss(student, torch.tensor([[math.log(3.0), 0.0]]), 1.0).item() == pytest.approx(expected, rel=1e-5)
    # At T = 2 the teacher logits 2 ln 3 soften to the same distribution; the loss is scaled by T^2 = 4.
    assert kd_loss(student, torch.tensor([[2 * math.log(3.0), 0.0]]), 2.0).item() == pytest.approx(
        4 * expected, rel=1e-5
    )


def test_kd_loss_is_zero_when_student_matches_teacher():
    logits = torch.randn(4, 5)
    assert kd_loss(logits, logits, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_pearson_per_image_by_hand():
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert pearson_per_image(a, b).tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-6)


def test_explanation_losses_by_hand():
    predicted = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    target = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert explanation_loss(predicted, target, "pearson").item() == pytest.approx((0.0 + 2.0) / 2, abs=1e-6)
    assert explanation_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]]), "mse").item() == pytest.approx(0.5)
    cosine = explanation_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), "cosine").item()
    assert cosine == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    # teacher mass all on cell 0, prediction uniform: KL = 1 * ln(1 / 0.5)
    kl = explanation_loss(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]]), "kl").item()
    assert kl == pytest.approx(math.log(2), abs=1e-4)
    with pytest.raises(ValueError, match="unknown explanation loss"):
        explanation_loss(predicted, target, "l1")


def test_attention_transfer_by_hand():
    # attention maps normalise to [1, 0] and [0, 1]: mean squared difference over 2 cells = 1
    student = [torch.tensor([[[[1.0, 0.0]]]])]
    teacher = [torch.tensor([[[[0.0, 3.0]]]])]
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(1.0)
    assert attention_transfer_loss(teacher, teacher).item() == pytest.approx(0.0)


def test_kd_reduces_to_ce_when_alpha_is_zero():
    torch.manual_seed(0)
    logits, teacher, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    parts = distillation_loss(logits, labels, teacher, temperature=4.0, alpha=0.0)
    assert parts["total"].item() == pytest.approx(F.cross_entropy(logits, labels).item())
    assert "kd" not in parts


def test_joint_loss_by_hand():
    """Every term against a value known by construction (not the code's own formula): uniform
    student logits over 2 classes (CE = ln 2), a teacher at softmax [0.75, 0.25] after T = 2
    (KD = T^2 (0.75 ln 1.5 + 0.25 ln 0.5)) and a head map anti-correlated with the teacher's
    (Pearson distance 2)."""
    logits, labels = torch.zeros(1, 2), torch.tensor([0])
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    maps, teacher_maps = torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[3.0, 2.0, 1.0]]])
    parts = distillation_loss(
        logits, labels, teacher, temperature=2.0, alpha=0.3, beta=5.0, predicted_maps=maps, teacher_maps=teacher_maps
    )
    kd = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert parts["ce"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert parts["explanation"].item() == pytest.approx(2.0, abs=1e-6)
    assert parts["total"].item() == pytest.approx(0.7 * math.log(2) + 0.3 * kd + 5.0 * 2.0, rel=1e-5)
    # A term whose weight is zero is neither computed nor added (plain CE when alpha = beta = 0).
    plain = distillation_loss(logits, labels, teacher, temperature=2.0, alpha=0.0, predicted_maps=maps)
    assert set(plain) == {"ce", "total"} and plain["total"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_honesty_term_moves_the_own_map_toward_the_head_and_not_the_head():
    """honesty_weight * L(own map, sg(head map)), L the e2kd distance: the own map [1, 2, 3]
    against a head map [3, 2, 1] is Pearson distance 2; its gradient reaches the own map only
    (the head's map is the target)."""
    logits, labels = torch.zeros(1, 2), torch.tensor([0])
    own = torch.tensor([[[1.0, 2.0, 3.0]]], requires_grad=True)
    head = torch.tensor([[[3.0, 2.0, 1.0]]], requires_grad=True)
    parts = distillation_loss(
        logits,
        labels,
        None,
        temperature=1.0,
        alpha=0.0,
        predicted_maps=head,
        student_cams=own,
        honesty_weight=0.5,
        e2kd_kind="pearson",
    )
    assert parts["honesty"].item() == pytest.approx(2.0, abs=1e-6)
    assert parts["total"].item() == pytest.approx(math.log(2) + 0.5 * 2.0, rel=1e-6)
    parts["total"].backward()
    assert own.grad is not None and own.grad.abs().sum() > 0 and head.grad is None
    with pytest.raises(ValueError, match="honesty_weight > 0 needs"):
        distillation_loss(logits, labels, None, temperature=1.0, alpha=0.0, predicted_maps=head, honesty_weight=1.0)
