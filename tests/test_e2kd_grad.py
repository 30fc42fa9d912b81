"""e2kd_grad: the student's own pixel-attribution map, made differentiable, pulled to an IG or
saliency teacher's map (e2KD for explainers other than Grad-CAM)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from torch import nn

from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.losses import differentiable_gradient_map, differentiable_integrated_gradients, distillation_loss
from xkd_ray.core.models import StudentNet
from xkd_ray.errors import XKDConfigError


def test_gradient_maps_by_hand_and_against_captum():
    """score = sum(W * x): d score / dx = W, so IG's one-step map is sum_c |x_c W_c| and saliency's
    sum_c |W_c|; captum's InputXGradient and Saliency give the same (unblurred) maps."""
    torch.manual_seed(0)
    weight = torch.randn(2, 3, 4, 4)  # 2 classes
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2, bias=False))
    model[1].weight.data = weight.flatten(1)
    images = torch.randn(5, 3, 4, 4, requires_grad=True)
    scores = model(images)[:, 1]
    ig = differentiable_gradient_map(images, scores, "integrated_gradients", blur_sigma=0.0)
    assert torch.allclose(ig, (images * weight[1]).abs().sum(dim=1))
    captum_ig = InputXGradient(model).attribute(images, target=1).abs().sum(dim=1)
    assert torch.allclose(ig, captum_ig, atol=1e-6)
    images = images.detach().requires_grad_(True)
    sal = differentiable_gradient_map(images, model(images)[:, 1], "saliency", blur_sigma=0.0)
    assert torch.allclose(sal, weight[1].abs().sum(dim=0).expand(5, 4, 4))
    assert torch.allclose(sal, Saliency(model).attribute(images, target=1, abs=True).sum(dim=1), atol=1e-6)


def test_few_step_integrated_gradients_by_hand_and_against_captum():
    """score = sum(W * x^2): d score / dx at a*x is 2aW x, so the k-step right Riemann IG is
    x * 2W x * mean(i/k) = (1 + 1/k) W x^2; exact IG (k -> inf) is W x^2, captum's with many steps.
    k = 1 is input x gradient (differentiable_gradient_map); the map's gradient reaches W."""
    torch.manual_seed(0)
    weight = torch.randn(2, 1, 4, 4, requires_grad=True)

    def model(x: torch.Tensor) -> torch.Tensor:
        return (x.pow(2).unsqueeze(1) * weight).flatten(2).sum(dim=2)  # [N, 2]

    images, targets = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 1, 0, 1])
    exact = (weight[targets] * images.pow(2)).abs().sum(dim=1)
    for steps in (1, 4, 16):
        ig = differentiable_integrated_gradients(model, images, targets, steps, blur_sigma=0.0)
        assert torch.allclose(ig, (1 + 1 / steps) * exact, atol=1e-5), steps
    captum = IntegratedGradients(model).attribute(images, target=targets, n_steps=64, method="riemann_right")
    ig = differentiable_integrated_gradients(model, images, targets, 64, blur_sigma=0.0)
    assert torch.allclose(ig, captum.abs().sum(dim=1), atol=1e-5)
    one_step = images.clone().requires_grad_(True)
    by_gradient = differentiable_gradient_map(
        one_step, model(one_step).gather(1, targets[:, None])[:, 0], "integrated_gradients", blur_sigma=0.0
    )
    assert torch.allclose(differentiable_integrated_gradients(model, images, targets, 1, 0.0), by_gradient)
    ig.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_the_gradient_map_term_trains_the_first_conv_layer():
    """create_graph: a loss on the map reaches the weights through the input gradient."""
    torch.manual_seed(0)
    student = StudentNet(1, 10, width=8)
    images = torch.randn(4, 1, 16, 16, requires_grad=True)
    output = student(images, return_all=True)
    targets = torch.tensor([1, 2, 3, 4])
    maps = differentiable_gradient_map(images, output.logits.gather(1, targets[:, None])[:, 0], "saliency", 1.0)
    parts = distillation_loss(
        output.logits, targets, None, temperature=1.0, alpha=0.0, e2kd_weight=1.0,
        student_cams=maps, teacher_maps=torch.rand(4, 16, 16),
    )  # fmt: skip
    parts["e2kd"].backward()
    first = next(module for module in student.modules() if isinstance(module, nn.Conv2d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_e2kd_grad_needs_a_pixel_attribution_teacher():
    with pytest.raises(XKDConfigError, match=r"distill\.method: e2kd_grad .* explain\.explainer must be one of"):
        ExperimentConfig().with_overrides({"distill.method": "e2kd_grad"})  # Grad-CAM by default
    config = ExperimentConfig().with_overrides({"distill.method": "e2kd_grad", "explain.explainer": "saliency"})
    assert config.distill.method == "e2kd_grad"
