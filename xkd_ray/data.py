"""The datasets the config can name (``DATASETS``), each loaded into the same three in-memory
splits (``xkd_ray.splits``), fixed by a seed.

Bad inputs (a missing folder, absent dataset files, a corrupt image) raise one ``XKDDataError``
naming the path and the fix, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xkd_ray.errors import XKDDataError
from xkd_ray.splits import SPLIT_NAMES, Split, Splits, assemble, carve_val, count_for, resize, take, uint8_to_float

if TYPE_CHECKING:  # the config names DATASETS' keys, so it imports this module, not the reverse
    from xkd_ray.config import DataConfig

__all__ = ["DATASETS", "SPLIT_NAMES", "Dataset", "Split", "Splits", "load_splits"]


# ----------------------------------------------------------------------------- datasets


def _load_digits(config: DataConfig) -> Splits:
    """scikit-learn's 8x8 digits ship with the library: the offline default for tests and demos."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = np.asarray(bunch.target, dtype=np.int64)
    total = len(labels)
    test, pool = take(np.arange(total), labels, count_for(config.test_fraction, total), config.seed)
    val, train = take(pool, labels[pool], count_for(config.val_fraction, total), config.seed + 1)
    if config.max_train_samples is not None and config.max_train_samples < len(train):
        train, _ = take(train, labels[train], config.max_train_samples, config.seed + 2)
    index = {"train": train, "val": val, "test": test}
    return assemble(
        "digits",
        "digits",
        config,
        {
            split: resize(images[torch.as_tensor(idx, dtype=torch.long)], config.image_size)
            for split, idx in index.items()
        },
        {split: labels[idx] for split, idx in index.items()},
        [str(digit) for digit in range(10)],
    )


def _root(config: DataConfig, *, may_create: bool) -> Path:
    if not config.root:
        raise XKDDataError(f"dataset {config.dataset!r} is read from a local folder; set data.root (--data-root)")
    root = Path(config.root).expanduser()
    if root.exists() and not root.is_dir():
        raise XKDDataError(f"{root}: data root is not a folder")
    if not root.exists() and not may_create:
        hint = " (or pass --download to fetch it there)" if DATASETS[config.dataset].downloadable else ""
        raise XKDDataError(f"{root}: data root folder does not exist{hint}")
    return root


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _open_torchvision(class_name: str, config: DataConfig, root: Path, train: bool) -> Any:
    """Open one official split, turning torchvision's generic errors into one actionable line."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, class_name)
    name = config.dataset
    try:
        return dataset_class(str(root), train=train, download=config.download)
    except RuntimeError as exc:
        if "not found" in str(exc):
            checksum = " (or they fail torchvision's md5 check)" if name.startswith("cifar") else ""
            raise XKDDataError(
                f"{root}: no {name} files found{checksum}; put the official files there "
                "or pass --download (needs network)"
            ) from exc
        if config.download:
            raise XKDDataError(f"{root}: downloading {name} failed ({_reason(exc)}); check network access") from exc
        raise XKDDataError(f"{root}: {name} files could not be read ({_reason(exc)})") from exc
    except OSError as exc:  # URLError is an OSError: no network while downloading
        action = "downloading" if config.download else "reading"
        raise XKDDataError(f"{root}: {action} {name} failed ({_reason(exc)})") from exc
    except Exception as exc:  # truncated idx files / pickles fail with asserts, ValueError, EOFError...
        raise XKDDataError(f"{root}: {name} files are corrupted ({_reason(exc)}); replace them") from exc


def _load_torchvision(class_name: str, config: DataConfig) -> Splits:
    """The official test split stays the test split so results compare with published numbers;
    val is carved out of the official train split."""
    root = _root(config, may_create=config.download)
    train_set = _open_torchvision(class_name, config, root, train=True)
    test_set = _open_torchvision(class_name, config, root, train=False)
    train_raw = torch.as_tensor(np.asarray(train_set.data))
    test_raw = torch.as_tensor(np.asarray(test_set.data))
    train_labels = np.asarray(train_set.targets, dtype=np.int64)
    test_labels = np.asarray(test_set.targets, dtype=np.int64)
    train_idx, val_idx = carve_val(train_labels, config.val_fraction, config.max_train_samples, config.seed)
    test_idx = np.arange(len(test_labels))
    size = config.image_size
    return assemble(
        config.dataset,
        str(root),
        config,
        {
            "train": uint8_to_float(train_raw, train_idx, size),
            "val": uint8_to_float(train_raw, val_idx, size),
            "test": uint8_to_float(test_raw, test_idx, size),
        },
        {"train": train_labels[train_idx], "val": train_labels[val_idx], "test": test_labels[test_idx]},
        list(train_set.classes),
    )


def _open_folder(directory: Path) -> Any:
    """ImageFolder's own errors name no folder; say which class folder is empty."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    if not directory.is_dir():
        raise XKDDataError(
            f"{directory}: folder not found; an imagefolder root needs train/ and test/, "
            "each with one sub-folder of images per class"
        )
    try:
        return ImageFolder(str(directory))
    except FileNotFoundError as exc:
        classes = sorted(entry for entry in directory.iterdir() if entry.is_dir())
        if not classes:
            raise XKDDataError(f"{directory}: no class sub-folders (expected one folder of images per class)") from exc
        empty = [
            str(folder)
            for folder in classes
            if not any(
                has_file_allowed_extension(path.name, IMG_EXTENSIONS) for path in folder.rglob("*") if path.is_file()
            )
        ]
        if not empty:
            raise XKDDataError(f"{directory}: {_reason(exc)}") from exc
        raise XKDDataError(
            f"{', '.join(empty)}: class folder has no images (supported extensions: {', '.join(IMG_EXTENSIONS)})"
        ) from exc


def _read_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """Decode to RGB so grey and colour files mix, and resize each file (their sizes may differ)."""
    from PIL import Image

    out = torch.empty((len(paths), 3, size, size), dtype=torch.float32)
    for row, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for broken files
            raise XKDDataError(f"{path}: cannot read image ({_reason(exc)}); fix or delete the file") from exc
        out[row] = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
    return out


def _load_imagefolder(config: DataConfig) -> Splits:
    """A user's own images in the ImageFolder layout: test/ is held out as given, val comes from train/."""
    root = _root(config, may_create=False)
    train_set = _open_folder(root / "train")
    test_set = _open_folder(root / "test")
    if list(train_set.classes) != list(test_set.classes):
        only_train = sorted(set(train_set.classes) - set(test_set.classes))
        only_test = sorted(set(test_set.classes) - set(train_set.classes))
        raise XKDDataError(
            f"{root}: class folders differ between train/ and test/ "
            f"(only in train/: {only_train or 'none'}; only in test/: {only_test or 'none'})"
        )
    train_labels = np.asarray(train_set.targets, dtype=np.int64)
    test_labels = np.asarray(test_set.targets, dtype=np.int64)
    train_idx, val_idx = carve_val(train_labels, config.val_fraction, config.max_train_samples, config.seed)
    train_paths = [path for path, _ in train_set.samples]
    test_paths = [path for path, _ in test_set.samples]
    size = config.image_size
    return assemble(
        "imagefolder",
        str(root),
        config,
        {
            "train": _read_images([train_paths[i] for i in train_idx], size),
            "val": _read_images([train_paths[i] for i in val_idx], size),
            "test": _read_images(test_paths, size),
        },
        {"train": train_labels[train_idx], "val": train_labels[val_idx], "test": test_labels},
        list(train_set.classes),
    )


@dataclass(frozen=True)
class Dataset:
    """One dataset the config can name: how to load it, and whether it lives in ``data.root``."""

    load: Callable[[DataConfig], Splits]
    description: str
    needs_root: bool = True
    downloadable: bool = False  # torchvision can fetch it into the root with --download


DATASETS: dict[str, Dataset] = {
    "digits": Dataset(_load_digits, "scikit-learn's 1,797 8x8 digits, shipped offline (default)", needs_root=False),
    "mnist": Dataset(partial(_load_torchvision, "MNIST"), "torchvision MNIST", downloadable=True),
    "fashion_mnist": Dataset(partial(_load_torchvision, "FashionMNIST"), "torchvision FashionMNIST", downloadable=True),
    "cifar10": Dataset(partial(_load_torchvision, "CIFAR10"), "torchvision CIFAR-10", downloadable=True),
    "cifar100": Dataset(partial(_load_torchvision, "CIFAR100"), "torchvision CIFAR-100", downloadable=True),
    "imagefolder": Dataset(_load_imagefolder, "your images: root/train/<class>/*, root/test/<class>/*"),
}


def load_splits(config: DataConfig) -> Splits:
    """Load, split and normalise ``config.dataset``; the same config always gives the same tensors.

    ``test_fraction`` applies only to digits: torchvision datasets and image folders come with
    their own test split, which is kept as is.
    """
    if config.dataset not in DATASETS:
        raise XKDDataError(f"data.dataset: got {config.dataset!r}; allowed values are {', '.join(DATASETS)}")
    return DATASETS[config.dataset].load(config)
