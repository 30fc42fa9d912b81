"""ROAD: Remove And Debias (Rong et al., ICML 2022), with noisy linear imputation.

Deletion with a constant baseline leaks the removed shape: the model can read *where* pixels
were removed (a hole the map drew) rather than *what* was there, so a map scores well by
drawing a telling mask. ROAD removes the pixels a map ranks first and fills each removed pixel
with the weighted mean of its 8 neighbours (4 direct neighbours weight 1/6, 4 diagonal 1/12,
renormalised over the neighbours that lie inside the image), where known pixels stay fixed and
removed ones are solved for jointly: one sparse linear system per image and removal step, the
same matrix for every channel. Small Gaussian noise (sigma 0.01, the paper's value, in the
normalised input space) is added to the imputed values only, so the fill carries no exact
smoothness signature either.

Curves follow ``faithfulness.perturbation_curves``: the model's probability of its own
prediction on the unperturbed image after 0, 1/k, ..., k/k of the pixels were removed, in
most-relevant-first (MoRF: a faithful map makes it fall fast, low AUC) or least-relevant-first
(LeRF: a faithful map keeps it high, high AUC) order. With every pixel removed no known pixel
is left to impute from; that last point is the dataset mean (0) plus the same noise, the same
image whatever the map.

Written with scipy rather than taken from Quantus (``quantus.ROAD``): Quantus is not a
dependency (see ``faithfulness``), and its ROAD imputes one image at a time in Python as well.
A factorisation (``splu``) solved for all channels at once was measured against ``spsolve`` per
channel and a dense solve in docs/FAITHFULNESS.md.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from xkd_ray.core.faithfulness import image_seed, pixel_order

Model = Callable[[torch.Tensor], torch.Tensor]

ROAD_STEPS = 5
NOISE = 0.01  # the paper's sigma
_NEIGHBOURS = tuple(
    (dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
)


@lru_cache(maxsize=16)
def _pairs(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (pixel, in-image neighbour, weight) of an H x W grid, flat indices."""
    ys, xs = np.mgrid[0:height, 0:width]
    sources, targets, weights = [], [], []
    for dy, dx, weight in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        sources.append((ys * width + xs)[inside])
        targets.append((ny * width + nx)[inside])
        weights.append(np.full(int(inside.sum()), weight))
    return np.concatenate(sources), np.concatenate(targets), np.concatenate(weights)


def noisy_linear_impute(
    image: np.ndarray, removed: np.ndarray, *, noise: float = NOISE, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``image`` [C, H, W] with the pixels where ``removed`` [H, W] is true replaced by the
    solution of x_p = sum_q w_pq x_q / sum_q w_pq over p's in-image neighbours q (known ones
    fixed), plus N(0, noise^2) on the replaced values. Every pixel removed: 0 plus the noise."""
    channels, height, width = image.shape
    flat = image.reshape(channels, -1).astype(np.float64)
    mask = removed.reshape(-1).astype(bool)
    out = flat.copy()
    unknown = np.flatnonzero(mask)
    if unknown.size == 0:
        return image.copy()
    if unknown.size == mask.size:
        out[:] = 0.0
    else:
        position = np.full(mask.size, -1)
        position[unknown] = np.arange(unknown.size)
        source, target, weight = _pairs(height, width)
        rows = mask[source]
        source, target, weight = source[rows], target[rows], weight[rows]
        total = np.bincount(position[source], weights=weight, minlength=unknown.size)
        inner = mask[target]
        matrix = scipy.sparse.coo_matrix(
            (
                np.concatenate([total, -weight[inner]]),
                (
                    np.concatenate([np.arange(unknown.size), position[source[inner]]]),
                    np.concatenate([np.arange(unknown.size), position[target[inner]]]),
                ),
            ),
            shape=(unknown.size, unknown.size),
        ).tocsc()
        known = ~inner
        right = np.zeros((unknown.size, channels))
        for channel in range(channels):
            right[:, channel] = np.bincount(
                position[source[known]], weights=weight[known] * flat[channel, target[known]], minlength=unknown.size
            )
        solution = scipy.sparse.linalg.splu(matrix).solve(right)
        out[:, unknown] = solution.T
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        out[:, unknown] += noise * rng.standard_normal((channels, unknown.size))
    return out.reshape(image.shape).astype(image.dtype)


@torch.no_grad()
def road_curves(
    model: Model,
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    steps: int = ROAD_STEPS,
    seed: int = 0,
    noise: float = NOISE,
    batch_size: int = 512,
    ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """MoRF and LeRF curves, each [N, steps + 1]: the probability of the model's own prediction
    on the unperturbed image after 0, 1/k, ..., k/k of the pixels (in map order: most relevant
    first for "morf", least relevant first for "lerf") were removed and imputed. ``ids``: each
    image's index in its split, which seeds its tie order and noise (default: 0..N-1)."""
    count, _, height, width = images.shape
    cells = height * width
    ids = torch.arange(count) if ids is None else ids
    order = pixel_order(maps, seed, ids)  # most to least relevant, ties in random order
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cells).expand(count, cells))
    device = images.device
    pixels = images.detach().float().cpu().numpy()
    rngs = [np.random.default_rng(image_seed(seed, i)) for i in ids.tolist()]
    targets = _probabilities(model, images, batch_size).argmax(dim=1)
    curves: dict[str, list[torch.Tensor]] = {"morf": [], "lerf": []}
    for step in range(steps + 1):
        removed_count = round(step / steps * cells)
        for name, removed in (("morf", rank < removed_count), ("lerf", rank >= cells - removed_count)):
            masks = removed.view(count, height, width).numpy()
            perturbed = np.stack(
                [noisy_linear_impute(pixels[i], masks[i], noise=noise, rng=rngs[i]) for i in range(count)]
            )
            batch = torch.from_numpy(perturbed).to(device=device, dtype=images.dtype)
            curves[name].append(_probabilities(model, batch, batch_size).gather(1, targets[:, None])[:, 0].cpu())
    return {name: torch.stack(values, dim=1) for name, values in curves.items()}


def _probabilities(model: Model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [model(images[i : i + batch_size]).float().softmax(dim=1) for i in range(0, len(images), batch_size)]
    )
