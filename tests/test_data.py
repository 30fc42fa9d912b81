"""Data loading on real data: sklearn digits, and tiny files written in the official formats.

No network and no mocks of our own code: MNIST/FashionMNIST idx files, CIFAR pickles and an
ImageFolder tree are written into tmp_path and read back through torchvision.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xkd_ray.config.schema import DataConfig
from xkd_ray.data.datasets import Split, Splits, load_splits
from xkd_ray.errors import XKDDataError

DIGITS_TOTAL = 1797


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_splits(DataConfig())


def _row_keys(split: Split) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.images.reshape(len(split), -1)}


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_sizes(digits: Splits) -> None:
    assert (digits.name, digits.num_classes, digits.in_channels, digits.image_size) == ("digits", 10, 1, 32)
    assert digits.class_names == tuple(str(d) for d in range(10))
    assert len(digits.train) + len(digits.val) + len(digits.test) == DIGITS_TOTAL
    assert len(digits.test) == round(0.2 * DIGITS_TOTAL) and len(digits.val) == round(0.15 * DIGITS_TOTAL)
    for name in ("train", "val", "test"):
        part = digits.split(name)
        assert part.images.shape == (len(part), 1, 32, 32) and part.images.dtype == torch.float32
        assert part.labels.dtype == torch.int64 and set(part.labels.tolist()) == set(range(10))
    summary = digits.describe()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["sizes"] == {"train": len(digits.train), "val": len(digits.val), "test": len(digits.test)}


def test_digits_splits_are_disjoint(digits: Splits) -> None:
    # sklearn's digits hold no duplicate images, so equal rows would mean a leaked image.
    train, val, test = (_row_keys(digits.split(name)) for name in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == DIGITS_TOTAL
    assert not (train & val) and not (train & test) and not (val & test)


def test_train_split_is_standardised(digits: Splits) -> None:
    images = digits.train.images.double()
    assert abs(images.mean().item()) < 1e-4
    assert abs(images.std().item() - 1.0) < 1e-3


def test_same_seed_same_tensors_other_seed_other_fingerprint(digits: Splits) -> None:
    again = load_splits(DataConfig())
    for name in ("train", "val", "test"):
        assert torch.equal(again.split(name).images, digits.split(name).images)
        assert torch.equal(again.split(name).labels, digits.split(name).labels)
    assert again.fingerprint() == digits.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", digits.fingerprint())
    assert load_splits(DataConfig(seed=1)).fingerprint() != digits.fingerprint()


def test_image_size_and_train_subset() -> None:
    small = load_splits(DataConfig(image_size=16))
    assert small.image_size == 16 and small.train.images.shape[1:] == (1, 16, 16)
    subset = load_splits(DataConfig(image_size=16, max_train_samples=100))
    assert len(subset.train) == 100
    # Subsetting happens after val/test are carved, so they are unchanged.
    assert torch.equal(subset.test.labels, small.test.labels) and torch.equal(subset.val.labels, small.val.labels)
    assert subset.fingerprint() != small.fingerprint()


def test_unknown_split_name(digits: Splits) -> None:
    with pytest.raises(XKDDataError, match="validation"):
        digits.split("validation")


# ----------------------------------------------------------------------------- official formats


def _write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Uncompressed idx files as torchvision's MNIST reads them from ``<root>/<Class>/raw``."""
    raw.mkdir(parents=True, exist_ok=True)
    count, height, width = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, count, height, width) + images.astype(np.uint8).tobytes()
    )
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, count) + labels.astype(np.uint8).tobytes()
    )


def _labels(count: int, classes: int) -> np.ndarray:
    return np.arange(count) % classes


@pytest.mark.parametrize(("dataset", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_style_idx_files(tmp_path: Path, dataset: str, folder: str) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    _write_idx(raw, "train", rng.integers(0, 256, (40, 28, 28)), _labels(40, 10))
    _write_idx(raw, "t10k", rng.integers(0, 256, (10, 28, 28)), _labels(10, 10))

    splits = load_splits(DataConfig(dataset=dataset, root=str(tmp_path), image_size=16, val_fraction=0.25))
    assert (splits.name, splits.num_classes, splits.in_channels, splits.image_size) == (dataset, 10, 1, 16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    assert splits.train.images.shape == (30, 1, 16, 16)
    assert torch.equal(splits.test.labels, torch.as_tensor(_labels(10, 10)))

    subset = load_splits(DataConfig(dataset=dataset, root=str(tmp_path), image_size=16, max_train_samples=12))
    assert len(subset.train) == 12 and len(subset.test) == 10


def _write_cifar(root: Path, hundred: bool, rng: np.random.Generator) -> None:
    """The python-pickle layout of cifar-10-batches-py / cifar-100-python."""
    classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"

    def batch(name: str, count: int) -> None:
        data = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: _labels(count, classes).tolist()}, f)

    names = [f"class{i}" for i in range(classes)]
    if hundred:
        batch("train", 200)
        batch("test", 20)
        meta = ("meta", {"fine_label_names": names})
    else:
        for i in range(1, 6):
            batch(f"data_batch_{i}", 8)
        batch("test_batch", 10)
        meta = ("batches.meta", {"label_names": names})
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_python_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: str) -> None:
    # torchvision checks each CIFAR file against the md5 of the official download, which files we
    # write cannot match; only that integrity check is replaced by "the file exists".
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    hundred = dataset == "cifar100"
    _write_cifar(tmp_path, hundred, np.random.default_rng(1))

    splits = load_splits(DataConfig(dataset=dataset, root=str(tmp_path), image_size=16, val_fraction=0.25))
    train_total, test_total, classes = (200, 20, 100) if hundred else (40, 10, 10)
    assert (splits.num_classes, splits.in_channels) == (classes, 3)
    assert splits.class_names[:2] == ("class0", "class1")
    assert len(splits.train) + len(splits.val) == train_total and len(splits.test) == test_total
    assert len(splits.val) == train_total // 4
    assert splits.train.images.shape[1:] == (3, 16, 16)
    channel_means = splits.train.images.mean(dim=(0, 2, 3))
    assert torch.allclose(channel_means, torch.zeros(3), atol=1e-4)


def _write_png(path: Path, mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((24, 20, 3), value, dtype=np.uint8)
    pixels[:, :10] = 255 - value  # some structure so the std is not zero
    image = Image.fromarray(pixels, mode="RGB")
    (image if mode == "RGB" else image.convert(mode)).save(path)


def _image_tree(root: Path, train_per_class: int = 4, test_per_class: int = 2) -> Path:
    for c, cls in enumerate(("cat", "dog")):
        for i in range(train_per_class):
            _write_png(root / "train" / cls / f"{i}.png", "RGB" if i % 2 else "L", 40 * c + 10 * i)
        for i in range(test_per_class):
            _write_png(root / "test" / cls / f"{i}.png", "L" if i % 2 else "RGB", 40 * c + 5 * i)
    return root


def test_imagefolder_tree(tmp_path: Path) -> None:
    root = _image_tree(tmp_path / "pets")
    splits = load_splits(DataConfig(dataset="imagefolder", root=str(root), image_size=16, val_fraction=0.25))
    assert (splits.name, splits.num_classes, splits.in_channels) == ("imagefolder", 2, 3)
    assert splits.class_names == ("cat", "dog")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 4)
    assert splits.val.labels.sort().values.tolist() == [0, 1]  # stratified
    assert splits.test.images.shape == (4, 3, 16, 16)
    assert splits.test.labels.tolist() == [0, 0, 1, 1]


def test_imagefolder_mixes_sizes_and_modes(tmp_path: Path) -> None:
    """Real folders mix grey, palette, alpha and colour files of any size: all become RGB at image_size."""
    root = _image_tree(tmp_path / "pets")
    for i, (mode, size) in enumerate([("RGBA", (50, 31)), ("P", (9, 40)), ("LA", (64, 64)), ("CMYK", (17, 17))]):
        pixels = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGB").convert(mode).save(
            root / "train" / "cat" / f"odd{i}.{'jpg' if mode == 'CMYK' else 'png'}"
        )
    splits = load_splits(DataConfig(dataset="imagefolder", root=str(root), image_size=16, val_fraction=0.25))
    assert len(splits.train) + len(splits.val) == 12
    assert splits.train.images.shape[1:] == (3, 16, 16) and torch.isfinite(splits.train.images).all()


# ----------------------------------------------------------------------------- errors


def test_missing_root_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for dataset in ("mnist", "imagefolder"):
        with pytest.raises(XKDDataError, match=re.escape(str(missing))):
            load_splits(DataConfig(dataset=dataset, root=str(missing)))


def test_empty_mnist_root_suggests_download(tmp_path: Path) -> None:
    with pytest.raises(XKDDataError, match=rf"{re.escape(str(tmp_path))}: no mnist files found.*--download"):
        load_splits(DataConfig(dataset="mnist", root=str(tmp_path)))


def test_corrupt_mnist_file(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw, "train", np.zeros((4, 28, 28)), _labels(4, 4))
    _write_idx(raw, "t10k", np.zeros((2, 28, 28)), _labels(2, 2))
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(XKDDataError, match="corrupted"):
        load_splits(DataConfig(dataset="mnist", root=str(tmp_path)))


def test_imagefolder_missing_test_folder(tmp_path: Path) -> None:
    root = _image_tree(tmp_path / "pets", test_per_class=0)
    with pytest.raises(XKDDataError, match=re.escape(str(root / "test")) + ": folder not found"):
        load_splits(DataConfig(dataset="imagefolder", root=str(root)))


def test_imagefolder_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = _image_tree(tmp_path / "pets")
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(XKDDataError, match=re.escape(str(root / "train" / "bird")) + ": class folder has no images"):
        load_splits(DataConfig(dataset="imagefolder", root=str(root)))


def test_imagefolder_class_mismatch(tmp_path: Path) -> None:
    root = _image_tree(tmp_path / "pets")
    _write_png(root / "test" / "bird" / "0.png", "RGB", 7)
    with pytest.raises(XKDDataError, match=r"class folders differ.*only in test/: \['bird'\]"):
        load_splits(DataConfig(dataset="imagefolder", root=str(root)))


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = _image_tree(tmp_path / "pets")
    broken = root / "test" / "dog" / "broken.png"
    broken.write_bytes(b"this is not a png at all" * 4)
    with pytest.raises(XKDDataError, match=re.escape(str(broken)) + ": cannot read image"):
        load_splits(DataConfig(dataset="imagefolder", root=str(root)))


# ----------------------------------------------------------------------------- hostile image folders


def _class_counts(splits: Splits) -> list[int]:
    labels = torch.cat([splits.train.labels, splits.val.labels])
    return torch.bincount(labels, minlength=splits.num_classes).tolist()


def _load_folder(root: Path) -> Splits:
    return load_splits(DataConfig(dataset="imagefolder", root=str(root), image_size=16, val_fraction=0.25))


def test_imagefolder_symlink_loop_is_not_followed(tmp_path: Path) -> None:
    """``ln -s . train/cat/loop`` once multiplied 8 images into hundreds, with copies in both train and val."""
    root = _image_tree(tmp_path / "pets")
    os.symlink(".", root / "train" / "cat" / "loop", target_is_directory=True)
    splits = _load_folder(root)
    assert _class_counts(splits) == [4, 4]
    assert not _row_keys(splits.train) & _row_keys(splits.val)


def test_imagefolder_symlinks_into_test_are_skipped(tmp_path: Path) -> None:
    """A linked folder or file pointing at test/ must not put test images into training."""
    root = _image_tree(tmp_path / "pets")
    os.symlink("../../test/dog", root / "train" / "dog" / "leak", target_is_directory=True)
    os.symlink("../../test/cat/0.png", root / "train" / "cat" / "leak.png")
    splits = _load_folder(root)
    assert _class_counts(splits) == [4, 4] and len(splits.test) == 4


def test_imagefolder_linked_class_folder_is_not_a_class(tmp_path: Path) -> None:
    """``train/bird -> cat`` would make a third class holding cat's images under another label."""
    root = _image_tree(tmp_path / "pets")
    for split in ("train", "test"):
        os.symlink("cat", root / split / "bird", target_is_directory=True)
    splits = _load_folder(root)
    assert splits.class_names == ("cat", "dog") and _class_counts(splits) == [4, 4]


def test_imagefolder_hidden_entries_are_skipped(tmp_path: Path) -> None:
    """Jupyter checkpoints, dot-files and macOS ``._`` resource forks are neither classes nor images."""
    root = _image_tree(tmp_path / "pets")
    for split in ("train", "test"):
        _write_png(root / split / ".ipynb_checkpoints" / "0-checkpoint.png", "RGB", 3)  # would be a class
    _write_png(root / "train" / "cat" / ".ipynb_checkpoints" / "1-checkpoint.png", "RGB", 9)
    _write_png(root / "train" / "dog" / ".hidden.png", "RGB", 11)
    (root / "test" / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a png")
    splits = _load_folder(root)
    assert splits.class_names == ("cat", "dog")
    assert _class_counts(splits) == [4, 4] and len(splits.test) == 4


def test_imagefolder_needs_two_classes(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for i in range(4):
        _write_png(root / "train" / "cat" / f"{i}.png", "RGB", 10 * i)
        _write_png(root / "test" / "cat" / f"{i}.png", "RGB", 10 * i + 5)
    with pytest.raises(XKDDataError, match=re.escape(str(root / "train")) + r": .*needs at least 2 classes"):
        _load_folder(root)


def test_imagefolder_refuses_train_test_duplicates(tmp_path: Path) -> None:
    """A test image that is a byte copy of a train image would inflate the test score."""
    root = _image_tree(tmp_path / "pets")
    (root / "test" / "dog" / "copy.png").write_bytes((root / "train" / "dog" / "3.png").read_bytes())
    os.link(root / "train" / "cat" / "1.png", root / "test" / "cat" / "hardlink.png")
    pattern = r"2 test images are byte-identical to train/ images \(e\.g\. .*hardlink\.png = .*train/cat/1\.png\)"
    with pytest.raises(XKDDataError, match=pattern) as info:
        _load_folder(root)
    assert "\n" not in str(info.value)


def test_imagefolder_refuses_copies_inside_train_that_land_in_train_and_val(tmp_path: Path) -> None:
    """Val is carved from train/: a file copied inside train/ can put one image on both sides,
    and the search ranks students on val. Every image copied once: some copy pair straddles."""
    root = _image_tree(tmp_path / "pets")
    for path in sorted((root / "train").glob("*/*.png")):
        (path.parent / f"copy-{path.name}").write_bytes(path.read_bytes())
    pattern = r"val images? (is|are) \(carved from train/\) byte-identical to train images \(e\.g\. .*\.png = .*\.png\)"
    with pytest.raises(XKDDataError, match=pattern) as info:
        _load_folder(root)
    assert "\n" not in str(info.value)


def test_imagefolder_grey_images_become_three_equal_channels(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for c, cls in enumerate(("cat", "dog")):
        for i in range(4):
            _write_png(root / "train" / cls / f"{i}.png", "L", 40 * c + 10 * i + 1)
        _write_png(root / "test" / cls / "0.png", "L", 40 * c + 7)
    splits = _load_folder(root)
    assert splits.in_channels == 3
    images = torch.cat([splits.train.images, splits.test.images])
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
