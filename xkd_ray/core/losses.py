"""The training objective, as pure tensor functions a reader can check against the formulas.

    L = (1 - alpha) * CE(z_S, y) + alpha * T^2 * KL(softmax(z_T/T) || softmax(z_S/T))
        + beta * L_exp(m, E_T(x))                      (xd, xd_e2kd: the head's map m)
        + at_weight * AT(A_S, A_T)                     (at)
        + e2kd_weight * L_e2kd(GradCAM_S(x), E_T(x))   (e2kd, xd_e2kd: the student's own map)
        + honesty_weight * L_e2kd(GradCAM_S(x), sg(m))  (xd_e2kd: the own map pulled to the head's)
        (e2kd_grad: the student's own gradient map G_S(x) in place of GradCAM_S(x), below)

No I/O, no config objects: every function takes tensors and numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from xkd_ray.config.registries import EXPLANATION_LOSSES

_EPS = 1e-8


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits, labels)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(p_T || p_S) on temperature-softened logits, mean over the batch.

    The T^2 factor keeps the soft-target gradients on the same scale as CE's when T changes.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def pearson_per_image(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between paired maps, one value per image ([N, ...] -> [N]).

    A constant map has no defined correlation; it gets 0 (no evidence either way) rather
    than NaN, so one flat map cannot poison a batch mean.
    """
    a = maps_a.flatten(1).float()
    b = maps_b.flatten(1).float()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    correlation = (a * b).sum(dim=1) / denominator.clamp_min(_EPS)
    return torch.where(denominator > _EPS, correlation, torch.zeros_like(correlation))


def pearson_distance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (1.0 - pearson_per_image(predicted, target)).mean()


def mse_distance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(predicted.float(), target.float())


def cosine_distance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    cosine = F.cosine_similarity(predicted.flatten(1).float(), target.flatten(1).float(), dim=1)
    return (1.0 - cosine).mean()


def spatial_kl(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Maps as spatial probability distributions: KL(teacher || predicted)."""
    p_teacher = _as_distribution(target)
    p_predicted = _as_distribution(predicted)
    return (p_teacher * (torch.log(p_teacher + _EPS) - torch.log(p_predicted + _EPS))).sum(dim=1).mean()


def explanation_loss(predicted_maps: torch.Tensor, teacher_maps: torch.Tensor, kind: str = "pearson") -> torch.Tensor:
    """Distance between the head's maps and the teacher's (one of ``EXPLANATION_LOSSES``), mean over the batch."""
    if predicted_maps.shape != teacher_maps.shape:
        raise ValueError(f"map shapes differ: {tuple(predicted_maps.shape)} vs {tuple(teacher_maps.shape)}")
    if kind not in EXPLANATION_LOSSES:
        raise ValueError(f"unknown explanation loss {kind!r}; allowed: {', '.join(EXPLANATION_LOSSES)}")
    return EXPLANATION_LOSSES[kind](predicted_maps, teacher_maps)


def _as_distribution(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1).float().clamp_min(0.0) + _EPS
    return flat / flat.sum(dim=1, keepdim=True)


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis attention: mean over channels of A^2, flattened, L2-normalised."""
    attention = features.float().pow(2).mean(dim=1).flatten(1)
    return F.normalize(attention, dim=1)


def attention_transfer_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> torch.Tensor:
    """Sum over matched layers of mean over images and cells of (a_S - a_T)^2, as in the
    authors' reference code (student maps resized to the teacher's grid first)."""
    if len(student_features) != len(teacher_features):
        raise ValueError(f"{len(student_features)} student vs {len(teacher_features)} teacher feature maps")
    total = student_features[0].new_zeros(())
    for student_map, teacher_map in zip(student_features, teacher_features, strict=True):
        if student_map.shape[-2:] != teacher_map.shape[-2:]:
            student_map = F.interpolate(student_map, size=teacher_map.shape[-2:], mode="bilinear", align_corners=False)
        difference = attention_map(student_map) - attention_map(teacher_map)
        total = total + difference.pow(2).mean()
    return total


def differentiable_gradcam(
    features: torch.Tensor, class_scores: torch.Tensor, size: tuple[int, int] | torch.Size
) -> torch.Tensor:
    """Grad-CAM that a loss can train through: ReLU(sum_c mean_hw(d score / d A_c) * A_c),
    bilinearly upsampled to ``size`` ([N, C, h, w] features, [N] scores -> [N, H, W]).

    ``create_graph=True`` keeps the gradient itself differentiable, so a loss on the map reaches
    the network's weights (e2KD). Each image's score depends only on its own features (the
    student has no batch statistics), so the gradient of the summed scores is per-image.
    """
    (gradients,) = torch.autograd.grad(class_scores.sum(), features, create_graph=True)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def blur_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of [N, H, W] maps (kernel 2*ceil(2 sigma)+1), differentiable; sigma 0 = none.
    The teacher's pixel-attribution maps are blurred so (core.explain); a student map matched to
    them must be too."""
    if sigma <= 0:
        return maps
    # Imported here: torchvision pulls in torch._dynamo (~1.5 s per process), and most runs never blur.
    from torchvision.transforms.functional import gaussian_blur

    kernel = 2 * math.ceil(2 * sigma) + 1
    return gaussian_blur(maps.unsqueeze(1), [kernel, kernel], [sigma, sigma]).squeeze(1)


def differentiable_gradient_map(
    images: torch.Tensor, class_scores: torch.Tensor, explainer: str, blur_sigma: float
) -> torch.Tensor:
    """The teacher's pixel-attribution explainers made trainable (e2kd_grad), [N, C, H, W] -> [N, H, W]:

        G_S(x) = blur(sum_c |x_c * d s/d x_c|)   integrated_gradients (IG from a zero baseline, 1 step)
        G_S(x) = blur(sum_c |d s/d x_c|)         saliency

    ``images`` must require grad before the forward pass; ``create_graph=True`` lets a loss on the
    map reach the weights. Not min-max normalised like the teacher's maps: the e2KD loss is
    cosine, which ignores scale."""
    (gradients,) = torch.autograd.grad(class_scores.sum(), images, create_graph=True)
    attribution = gradients * images if explainer == "integrated_gradients" else gradients
    return blur_maps(attribution.abs().sum(dim=1), blur_sigma)


def differentiable_integrated_gradients(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    blur_sigma: float,
) -> torch.Tensor:
    """Integrated Gradients from a zero baseline, k-point right Riemann sum, made trainable
    (e2kd_grad with ``distill.student_ig_steps`` = k > 1), [N, C, H, W] -> [N, H, W]:

        G_S(x) = blur(sum_c |x_c * (1/k) sum_{i=1..k} d s_t/d x_c (i/k * x)|)

    ``model`` maps images to logits, ``targets`` [N] is each image's class t. The k scaled copies
    go through the model as one batch of k*N. k = 1 is input x gradient at x, the IG of
    ``differentiable_gradient_map``; the teacher's captum IG uses more steps (explain.ig_steps)."""
    alphas = torch.arange(1, steps + 1, dtype=images.dtype, device=images.device) / steps
    scaled = (alphas.view(-1, 1, 1, 1, 1) * images.detach().unsqueeze(0)).flatten(0, 1).requires_grad_(True)
    scores = model(scaled).gather(1, targets.repeat(steps).unsqueeze(1))
    (gradients,) = torch.autograd.grad(scores.sum(), scaled, create_graph=True)
    mean_gradient = gradients.view(steps, *images.shape).mean(dim=0)
    return blur_maps((images.detach() * mean_gradient).abs().sum(dim=1), blur_sigma)


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    beta: float = 0.0,
    predicted_maps: torch.Tensor | None = None,
    teacher_maps: torch.Tensor | None = None,
    explanation_kind: str = "pearson",
    at_weight: float = 0.0,
    student_features: list[torch.Tensor] | None = None,
    teacher_features: list[torch.Tensor] | None = None,
    e2kd_weight: float = 0.0,
    student_cams: torch.Tensor | None = None,
    e2kd_kind: str = "cosine",
    head_targets: torch.Tensor | None = None,
    honesty_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The joint loss and its parts (returned so training logs show what each term does).

    Terms whose weight is zero are not computed, so the plain student (alpha = beta = 0)
    and Hinton KD (beta = 0) are exactly special cases of the same function. ``head_targets``:
    what the head's map is matched to, when not the teacher's map (the student's own, detached).
    """
    parts: dict[str, torch.Tensor] = {"ce": cross_entropy(student_logits, labels)}
    total = (1.0 - alpha) * parts["ce"]
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("alpha > 0 needs teacher_logits")
        parts["kd"] = kd_loss(student_logits, teacher_logits, temperature)
        total = total + alpha * parts["kd"]
    if beta > 0 and predicted_maps is not None:
        target = teacher_maps if head_targets is None else head_targets
        if target is None:
            raise ValueError("beta > 0 with a head needs teacher_maps or head_targets")
        parts["explanation"] = explanation_loss(predicted_maps, target, explanation_kind)
        total = total + beta * parts["explanation"]
    if at_weight > 0 and student_features is not None:
        if teacher_features is None:
            raise ValueError("at_weight > 0 needs teacher_features")
        parts["at"] = attention_transfer_loss(student_features, teacher_features)
        total = total + at_weight * parts["at"]
    if e2kd_weight > 0:
        if student_cams is None or teacher_maps is None:
            raise ValueError("e2kd_weight > 0 needs student_cams and teacher_maps")
        # e2KD (Parchami et al., ECCV 2024) uses 1 - cos(student's own Grad-CAM, E_T); any
        # explanation loss can stand in (scale-invariant ones need no normalisation of the raw CAM).
        parts["e2kd"] = explanation_loss(student_cams, teacher_maps, e2kd_kind)
        total = total + e2kd_weight * parts["e2kd"]
    if honesty_weight > 0:
        if student_cams is None or predicted_maps is None:
            raise ValueError("honesty_weight > 0 needs student_cams and predicted_maps")
        # The head's map is the target, not a learner here (stop-gradient): the student's own
        # reason is moved toward the map it shows, so the shown map describes the student.
        parts["honesty"] = explanation_loss(student_cams, predicted_maps.detach(), e2kd_kind)
        total = total + honesty_weight * parts["honesty"]
    parts["total"] = total
    return parts
