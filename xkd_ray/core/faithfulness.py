"""Is a map the model's real reason? Deletion / insertion curves (Petsiuk et al. 2018, RISE) and
the model-randomisation check (Adebayo et al. 2018), as batched tensor functions.

Deletion: replace the pixels a map ranks highest by the baseline, a fraction 1/k at a time, and
follow the model's probability of its own (unperturbed) prediction; a map that finds the
evidence makes it fall fast (low AUC). Insertion: start from the baseline image and reveal the
pixels in the same order; a faithful map makes it rise fast (high AUC). The baseline is 0 in
the normalised input space, i.e. the training split's mean intensity, so a removed pixel carries
no contrast. Written here rather than taken from Quantus (``quantus.PixelFlipping`` computes the
same deletion curve: identical curves given our baseline and pixel order) because of what Quantus
brings: 224 MB of dependencies beyond ours (opencv, scikit-image), 1.35 s to import, an AUC
helper that fails on NumPy 2.x in 0.6.0, and a ``"black"`` baseline that means each image's
minimum, not a neutral value; per forward pass both run at the same speed
(``bench/faithfulness.py`` measures all of this).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

Model = Callable[[torch.Tensor], torch.Tensor]

# Each curve costs (STEPS + 1) forward passes per image and map, so a split's diagnostics are
# measured on its first IMAGES images (a fixed subset: the same images for every student and the
# teacher); 100 images keep the standard error of a mean AUC near 0.02 at a few seconds per split.
STEPS = 8
IMAGES = 100


def pixel_order(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Cells of each map from most to least important, ties in random (seeded) order: a flat
    or sparse map must not get the top-left-first order of a stable sort for free."""
    flat = maps.flatten(1).float()
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in range(len(flat))])
    shuffled = torch.gather(flat.cpu(), 1, permutation)
    order = torch.sort(shuffled, dim=1, descending=True, stable=True).indices
    return torch.gather(permutation, 1, order)


@torch.no_grad()
def perturbation_curves(
    model: Model, images: torch.Tensor, maps: torch.Tensor, *, steps: int = STEPS, seed: int = 0, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves, each [N, steps + 1]: the probability of the model's own
    prediction after 0, 1/k, ..., k/k of the pixels (in map order) were removed / revealed."""
    count, _, height, width = images.shape
    cells = height * width
    order = pixel_order(maps, seed)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cells).expand(count, cells))  # rank[i, cell] = position in the order
    rank = rank.to(images.device)
    baseline = torch.zeros_like(images)
    targets = _probabilities(model, images, batch_size).argmax(dim=1)
    deletion, insertion = [], []
    for step in range(steps + 1):
        chosen = (rank < round(step / steps * cells)).view(count, 1, height, width)
        for curve, perturbed in ((deletion, torch.where(chosen, baseline, images)),
                                 (insertion, torch.where(chosen, images, baseline))):  # fmt: skip
            probabilities = _probabilities(model, perturbed, batch_size)
            curve.append(probabilities.gather(1, targets[:, None])[:, 0])
    return torch.stack(deletion, dim=1), torch.stack(insertion, dim=1)


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under each curve over [0, 1] (trapezoids on k equal steps), one value per image."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)


def _probabilities(model: Model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [model(images[i : i + batch_size]).float().softmax(dim=1) for i in range(0, len(images), batch_size)]
    )


def randomised_copy(model: nn.Module, keep: Callable[[str], bool], seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose parameters are re-initialised, except those whose module name
    ``keep`` accepts: the model-parameter randomisation of Adebayo et al. 2018."""
    clone = copy.deepcopy(model)
    torch.manual_seed(seed)
    for name, module in clone.named_modules():
        if name and not keep(name) and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return clone.eval()
