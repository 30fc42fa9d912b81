"""Is a map the model's real reason? Deletion / insertion curves (Petsiuk et al. 2018, RISE), the
stratified image subset every perturbation metric uses, and the (cascading) model-randomisation
check (Adebayo et al. 2018) with the map similarities it is read by, as batched tensor functions.

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
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

Model = Callable[[torch.Tensor], torch.Tensor]

# Each deletion / insertion curve costs (STEPS + 1) forward passes per image and map.
STEPS = 8


def faithfulness_subset(labels: np.ndarray | torch.Tensor, size: int, seed: int) -> np.ndarray:
    """The images every perturbation metric is measured on: a stratified random sample of
    ``size`` of a split's images (all of them when the split is not larger), sorted indices.

    Each class gets its share of ``size`` in proportion to its count (largest remainders
    decide the rounding), drawn at random within the class with ``seed``: the same images for
    every student and the teacher, whatever their own seeds. A function of the labels only."""
    labels = np.asarray(labels).reshape(-1)
    if size >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    shares = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - shares), kind="stable")[: size - shares.sum()]:
        shares[index] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), share, replace=False) for c, share in zip(classes, shares, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def standard_error(values: torch.Tensor) -> float | None:
    """Standard error of the mean of per-image values (None with fewer than 2)."""
    values = values.double().flatten()
    return None if len(values) < 2 else float(values.std(unbiased=True) / math.sqrt(len(values)))


def image_seed(seed: int, image_id: int) -> int:
    """The seed of one image's random draws: a function of the image's index in its split, so a
    split measured in shards (Ray Train ranks) draws what the whole split would."""
    return (seed * 1_000_003 + int(image_id)) % 2**63


def pixel_order(maps: torch.Tensor, seed: int = 0, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Cells of each map from most to least important, ties in random (seeded) order: a flat
    or sparse map must not get the top-left-first order of a stable sort for free. With ``ids``
    (each map's image index), each map's tie order depends on its own index only."""
    flat = maps.flatten(1).float()
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.stack(
        [
            torch.randperm(
                flat.shape[1],
                generator=generator if ids is None else torch.Generator().manual_seed(image_seed(seed, i)),
            )
            for i in (range(len(flat)) if ids is None else ids.tolist())
        ]
    )
    shuffled = torch.gather(flat.cpu(), 1, permutation)
    order = torch.sort(shuffled, dim=1, descending=True, stable=True).indices
    return torch.gather(permutation, 1, order)


def random_maps(ids: torch.Tensor, height: int, width: int, seed: int) -> torch.Tensor:
    """Uniform random maps [N, H, W], one per image index (the control every curve is read against)."""
    return torch.stack(
        [
            torch.rand((height, width), generator=torch.Generator().manual_seed(image_seed(seed, i)))
            for i in ids.tolist()
        ]
    )


def shifted_maps(maps: torch.Tensor, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Each map circularly shifted by its own seeded offset, between 1/4 and 3/4 of the side on
    each axis: the control with the map's own smoothness and sparsity that points elsewhere.

    Uniform random maps are a biased control under ROAD: scattered pixels are easy to impute
    from their neighbours, so any smooth map loses to them under LeRF and beats them under MoRF
    whatever it points at (docs/FAITHFULNESS.md). A shifted map removes contiguous regions too."""
    height, width = maps.shape[-2:]
    shifted = []
    for map_, image_id in zip(maps, ids.tolist(), strict=True):
        generator = torch.Generator().manual_seed(image_seed(seed, image_id) ^ 0x5EED)
        dy = int(torch.randint(height // 4, height - height // 4 + 1, (1,), generator=generator))
        dx = int(torch.randint(width // 4, width - width // 4 + 1, (1,), generator=generator))
        shifted.append(torch.roll(map_, shifts=(dy, dx), dims=(-2, -1)))
    return torch.stack(shifted) if shifted else maps.clone()


@torch.no_grad()
def perturbation_curves(
    model: Model,
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    steps: int = STEPS,
    seed: int = 0,
    batch_size: int = 512,
    ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves, each [N, steps + 1]: the probability of the model's own
    prediction after 0, 1/k, ..., k/k of the pixels (in map order) were removed / revealed."""
    count, _, height, width = images.shape
    cells = height * width
    order = pixel_order(maps, seed, ids)
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


def cascade_layers(model: nn.Module, skip: tuple[str, ...] = ("head",)) -> list[str]:
    """The model's top-level parameterised children from the output back to the input (the
    order of the cascading randomisation), leaving out ``skip`` (an explanation head)."""
    names = [
        name
        for name, child in model.named_children()
        if name not in skip and next(child.parameters(), None) is not None
    ]
    return names[::-1]


def cascading_copies(model: nn.Module, layers: list[str], seed: int = 0) -> list[nn.Module]:
    """Adebayo et al. 2018's cascading randomisation: copy s re-initialises ``layers[:s + 1]``
    (the top s + 1 layers), each step adding the next layer down, the rest kept trained."""
    return [
        randomised_copy(model, keep=lambda name, cut=set(layers[: s + 1]): name.split(".")[0] not in cut, seed=seed)
        for s in range(len(layers))
    ]


def spearman_per_image(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of paired maps, one per image (ties get their average rank;
    a constant map gets 0, as in ``losses.pearson_per_image``)."""
    from scipy.stats import rankdata

    from xkd_ray.core.losses import pearson_per_image

    def ranks(maps: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(rankdata(maps.flatten(1).double().cpu().numpy(), axis=1))

    return pearson_per_image(ranks(maps_a), ranks(maps_b))


def ssim_per_image(maps_a: torch.Tensor, maps_b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004) of paired [N, H, W] maps, each min-max scaled
    to [0, 1] first (SSIM's constants assume a data range; raw gradients are tiny and would all
    look alike): uniform ``window`` x ``window`` windows (smaller maps: the largest odd window
    that fits), C1 = (0.01)^2, C2 = (0.03)^2, sample covariances as scikit-image."""

    def scaled(maps: torch.Tensor) -> torch.Tensor:
        flat = maps.double().cpu().flatten(1)
        low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
        return ((flat - low) / (high - low).clamp_min(1e-12)).view(maps.shape)[:, None]

    a, b = scaled(maps_a), scaled(maps_b)
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    pool = torch.nn.functional.avg_pool2d
    correction = size * size / max(size * size - 1, 1)
    mean_a, mean_b = pool(a, size, 1), pool(b, size, 1)
    var_a = (pool(a * a, size, 1) - mean_a**2) * correction
    var_b = (pool(b * b, size, 1) - mean_b**2) * correction
    cov = (pool(a * b, size, 1) - mean_a * mean_b) * correction
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return ssim.flatten(1).mean(dim=1).float()
