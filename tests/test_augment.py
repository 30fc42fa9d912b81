"""Augmentation keeps the teacher's cached map aligned with its image (real digits, real Grad-CAM)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xkd_ray.config.schema import DataConfig
from xkd_ray.core.augment import AugmentCollate, augment_pair, hflip
from xkd_ray.core.distill import epoch_loader
from xkd_ray.core.explain import explain_maps
from xkd_ray.core.models import build_teacher


def test_crop_and_flip_are_the_same_draw_for_image_and_map(tiny_data) -> None:
    """A map that *is* the image's channel must still be that channel after augmentation: the
    crop box, the resize and the flip were drawn once and applied to both (exact)."""
    images = tiny_data.splits.train.images[:64]
    augmented, maps = augment_pair(images, images[:, 0].clone(), torch.Generator().manual_seed(3))
    assert torch.allclose(maps, augmented[:, 0], atol=1e-6)
    assert not torch.allclose(augmented, images)  # something was transformed
    flipped = sum(bool(torch.equal(augmented[i], hflip(images[i]))) for i in range(len(images)))
    assert flipped < len(images)  # not every image is a plain flip: crops happened too


def _symmetric(model: nn.Module) -> nn.Module:
    """Left-right symmetric conv kernels make the network exactly flip-equivariant up to its
    global pooling, so Grad-CAM(flip x) must equal flip(Grad-CAM(x)) to float rounding."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
    return model.eval()


def test_flipped_cached_map_is_the_map_of_the_flipped_image_exactly() -> None:
    torch.manual_seed(0)
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images[:48] / 16.0, dtype=torch.float32).unsqueeze(1)
    images = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    teacher = _symmetric(build_teacher("vgg", 1, 10, 8))
    cached = explain_maps(teacher, images).maps
    targets = teacher(images).argmax(dim=1)
    recomputed = explain_maps(teacher, hflip(images), targets).maps
    # Tolerance 1e-4 on maps in [0, 1]: float32 rounding only (the transform is exact).
    assert torch.allclose(hflip(cached), recomputed, atol=1e-4)
    assert not torch.allclose(cached, recomputed, atol=1e-2)  # the maps are not flip-symmetric themselves


def test_augment_defaults_and_digits_path_is_unchanged(tiny_config, tiny_data) -> None:
    assert not tiny_config.data.augment_on  # digits: off
    assert DataConfig(dataset="imagefolder", root="/x").augment_on
    assert DataConfig(dataset="cifar10", root="/x").augment_on
    assert not DataConfig(dataset="imagefolder", root="/x", augment=False).augment_on
    # Off: the batches are exactly the in-memory rows the sampler picks (no collate of ours).
    loader = epoch_loader(tiny_config, tiny_data, 1)
    assert loader.collate_fn.__class__ is not AugmentCollate
    images, labels, _, maps = next(iter(loader))
    first = list(iter(loader.sampler))[: len(labels)]
    assert torch.equal(images, tiny_data.splits.train.images[first])
    assert torch.equal(maps, tiny_data.teacher_outputs["train"].maps[first])


@pytest.mark.parametrize("epoch", [0, 3])
def test_augmented_batches_are_reproducible(tiny_config, tiny_data, epoch: int) -> None:
    config = tiny_config.with_overrides({"data.augment": True})
    first = [batch[0] for batch in epoch_loader(config, tiny_data, epoch)]
    again = [batch[0] for batch in epoch_loader(config, tiny_data, epoch)]
    other = next(iter(epoch_loader(config, tiny_data, epoch + 1)))[0]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other)
