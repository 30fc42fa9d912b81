"""Augmentation that keeps the teacher's cached map aligned with its image.

A teacher map is spatial: the map of a flipped image is the flipped map, and the map of a crop
is (up to the network's own boundary effects) the crop of the map. So every spatial transform
drawn for an image is applied, identically, to its cached map, and the cache computed once on
the untransformed images stays a valid target. Only spatial transforms are offered: a colour
jitter would change what the teacher sees without a known effect on its map.

Transforms are drawn from a generator seeded by (seed, epoch, batch number), so a run, a resumed
run and every worker count see the same augmented batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALE = (0.6, 1.0)  # area fraction of the crop (torchvision's default 0.08 destroys 8-32 px images)
RATIO = (3 / 4, 4 / 3)  # aspect ratio range, torchvision's default


def _crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """top, left, h, w of a random resized crop (torchvision's RandomResizedCrop.get_params, with
    an explicit generator so the draw is reproducible; falls back to the whole image)."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * float(torch.rand((), generator=generator)))
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(torch.rand((), generator=generator)))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    return 0, 0, height, width


def crop_resize(tensor: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Crop [.., H, W] to ``box`` and resize back to H x W (bilinear, as torchvision's default)."""
    top, left, h, w = box
    size = tensor.shape[-2:]
    part = tensor[..., top : top + h, left : left + w]
    if part.shape[-2:] == size:
        return part.clone()
    squeeze = part.ndim == 3
    batch = part.unsqueeze(0) if squeeze else part
    out = F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False)
    return out[0] if squeeze else out


def hflip(tensor: torch.Tensor) -> torch.Tensor:
    """Mirror left-right ([.., H, W]); the same function for images and maps."""
    return tensor.flip(-1)


def augment_pair(
    images: torch.Tensor, maps: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop then horizontal flip (p = 0.5), the same draw for each image [C, H, W]
    and its map [H, W]. Maps stay in [0, 1] (bilinear interpolation is a convex combination)."""
    out_images = torch.empty_like(images)
    out_maps = torch.empty_like(maps)
    height, width = images.shape[-2:]
    for row in range(len(images)):
        box = _crop_box(height, width, generator)
        image, cam = crop_resize(images[row], box), crop_resize(maps[row].unsqueeze(0), box)[0]
        if float(torch.rand((), generator=generator)) < 0.5:
            image, cam = hflip(image), hflip(cam)
        out_images[row], out_maps[row] = image, cam
    return out_images, out_maps


class AugmentCollate:
    """A DataLoader ``collate_fn`` for (image, label, logits, map) samples that augments each batch.

    The generator is reseeded per batch from (seed, epoch, batch number): reproducible, and
    independent of DataLoader worker processes."""

    def __init__(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch, self.batch = seed, epoch, 0

    def __call__(self, samples: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        images, labels, logits, maps = (torch.stack(column) for column in zip(*samples, strict=True))
        return self.augment(images, labels, logits, maps)

    def augment(self, images, labels, logits, maps) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.batch)) & 0x7FFFFFFF)
        self.batch += 1
        images, maps = augment_pair(images, maps, generator)
        return images, labels, logits, maps
