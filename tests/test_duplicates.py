"""``data.duplicates: refuse | drop`` on a real ImageFolder tree of scikit-learn digits with byte copies."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from xkd_ray.config.schema import DataConfig, ExperimentConfig
from xkd_ray.data.datasets import load_splits
from xkd_ray.data.splits import SPLIT_NAMES
from xkd_ray.data.streaming import stream_imagefolder
from xkd_ray.errors import XKDConfigError, XKDDataError


def _digits_tree(root: Path, count: int = 80) -> Path:
    bunch = load_digits()
    seen: dict[int, int] = {}
    for index in range(count):
        label = int(bunch.target[index])
        seen[label] = seen.get(label, 0) + 1
        folder = root / ("test" if seen[label] <= 2 else "train") / str(label)  # 2 test images a class
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((bunch.images[index] / 16 * 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
    return root


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())


@pytest.fixture()
def trees(tmp_path: Path) -> tuple[Path, Path]:
    """A tree with copies, and the same tree cleaned by hand the way ``drop`` promises to."""
    clean = _digits_tree(tmp_path / "clean")
    root = tmp_path / "copies"
    shutil.copytree(clean, root)
    train, test = sorted((root / "train").glob("*/*.png")), sorted((root / "test").glob("*/*.png"))
    _copy(train[0], train[0].with_name("zz-a.png"))  # a group of 3 inside train/: the first path stays
    _copy(train[0], train[0].with_name("zz-b.png"))
    _copy(train[5], train[5].with_name("zz-c.png"))  # a pair inside train/
    _copy(train[9], root / "test" / train[9].parent.name / "zz-d.png")  # a train/ image copied into test/
    _copy(test[2], test[2].with_name("zz-e.png"))  # a pair inside test/
    # By hand: delete the later copies, and the train/ copy of the image that is also in test/.
    clean_train = sorted((clean / "train").glob("*/*.png"))
    clean_train[9].rename(clean / "test" / clean_train[9].parent.name / "zz-d.png")
    return root, clean


def _config(root: Path, **settings: object) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), image_size=16, val_fraction=0.2, **settings)


def test_refuse_stays_the_default(trees) -> None:
    root, _ = trees
    assert _config(root).duplicates == "refuse"
    with pytest.raises(XKDDataError, match=r"1 test image is byte-identical to train/ images"):
        load_splits(_config(root))


def test_drop_keeps_one_copy_each_and_equals_the_tree_cleaned_by_hand(trees, caplog) -> None:
    root, clean = trees
    with caplog.at_level(logging.WARNING, logger="xkd_ray.data.duplicates"):
        dropped = load_splits(_config(root, duplicates="drop"))
    report = [record.getMessage() for record in caplog.records]
    assert report == [
        f"{root}: data.duplicates=drop: dropped 5 byte-identical files (3 inside train/, 1 inside test/, "
        "1 train/ copies of test/ images), keeping one copy of each of 4 groups"
    ]
    by_hand = load_splits(_config(clean))
    assert dropped.fingerprint() == by_hand.fingerprint()  # the same data: the same teacher and caches
    for name in SPLIT_NAMES:
        assert torch.equal(dropped.split(name).images, by_hand.split(name).images)
        assert torch.equal(dropped.split(name).labels, by_hand.split(name).labels)
    sizes = {name: len(dropped.split(name)) for name in SPLIT_NAMES}
    assert sum(sizes.values()) == 80 and sizes["test"] == 21  # the test/ copy of a train image stays in test
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xkd_ray.data.duplicates"):
        assert load_splits(_config(clean, duplicates="drop")).fingerprint() == by_hand.fingerprint()
    assert not caplog.records  # nothing to drop, nothing said


def test_streamed_drop_reads_the_same_images(trees, tmp_path) -> None:
    root, _ = trees
    memory = load_splits(_config(root, duplicates="drop"))
    stream = stream_imagefolder(_config(root, duplicates="drop"), tmp_path / "cache")
    for name in SPLIT_NAMES:
        assert torch.equal(stream.split(name).labels, memory.split(name).labels)
        ids = np.arange(len(stream.split(name)))
        assert torch.allclose(stream.split(name).read(ids), memory.split(name).images, atol=1e-4)


def test_duplicates_setting_is_checked_at_load() -> None:
    with pytest.raises(XKDConfigError, match=r"^data.duplicates: got 'keep'; allowed values are refuse, drop$"):
        ExperimentConfig().with_overrides({"data.duplicates": "keep"})
    with pytest.raises(XKDConfigError, match=r"^data.duplicates: drop applies to image folders only"):
        ExperimentConfig().with_overrides({"data.duplicates": "drop"})
