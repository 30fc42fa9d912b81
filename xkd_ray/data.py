"""Every dataset becomes the same three in-memory tensors, fixed by a seed.

Teacher, explanations and every student in a search must see exactly the same images, so the
splits are computed once, deterministically, and fingerprinted: the fingerprint keys the teacher
checkpoint and the explanation cache, so a change in the data can never reuse a stale artefact.
The datasets are small enough to live in memory as one float tensor per split, which keeps the
training loops free of per-item decoding and makes the data trivially shareable (``ray.put``).

Bad inputs (a missing folder, absent dataset files, a corrupt image) raise one ``XKDDataError``
naming the path and the fix, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from xkd_ray.errors import XKDDataError

if TYPE_CHECKING:  # the config names DATASETS' keys, so it imports this module, not the reverse
    from xkd_ray.config import DataConfig

SPLIT_NAMES = ("train", "val", "test")
# Converting a whole torchvision split at once would briefly hold several float copies of it
# (CIFAR-10 train alone is 600 MB as float32); chunks bound that peak.
_CHUNK = 8192


@dataclass(frozen=True, eq=False)
class Split:
    """One split as tensors, so training and evaluation never decode images again.

    ``eq=False``: comparing tensors element-wise inside a generated ``__eq__`` is ambiguous;
    compare ``Splits.fingerprint()`` instead.
    """

    images: torch.Tensor  # float32 [N, C, H, W], normalised with the train split's statistics
    labels: torch.Tensor  # int64 [N]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise XKDDataError(
                f"split images must be float32 [N, C, H, W]; got {self.images.dtype} {list(self.images.shape)}"
            )
        if self.labels.ndim != 1 or self.labels.dtype != torch.int64:
            raise XKDDataError(f"split labels must be int64 [N]; got {self.labels.dtype} {list(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise XKDDataError(f"split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class Splits:
    """The three splits plus what models need to be built for them (classes, channels, size)."""

    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    class_names: tuple[str, ...]
    # Hashing CIFAR-sized tensors takes about a second and the pipeline asks several times;
    # the tensors are treated as read-only, so the first answer stays valid.
    _fingerprint: list[str] = field(default_factory=list, init=False, repr=False)

    def split(self, name: str) -> Split:
        """Look a split up by the name used in cache files and metrics."""
        if name not in SPLIT_NAMES:
            raise XKDDataError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def fingerprint(self) -> str:
        """Content hash of the exact tensors: the key under which teachers and explanations are cached.

        Hashing the bytes (not the config) means a different seed, size, subset or a changed file
        on disk all give a new key, while the same data reached by another config reuses the cache.
        """
        if not self._fingerprint:
            digest = hashlib.sha256()
            shapes = {
                name: [list(self.split(name).images.shape), list(self.split(name).labels.shape)] for name in SPLIT_NAMES
            }
            digest.update(json.dumps({"name": self.name, "shapes": shapes}, sort_keys=True).encode())
            for name in SPLIT_NAMES:
                part = self.split(name)
                for tensor in (part.images, part.labels):
                    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint.append(digest.hexdigest()[:16])
        return self._fingerprint[0]

    def describe(self) -> dict[str, Any]:
        """What is saved next to every model, so a result can be traced back to its data."""
        return {
            "name": self.name,
            "sizes": {name: len(self.split(name)) for name in SPLIT_NAMES},
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
        }


# ----------------------------------------------------------------------------- splitting


def _count(fraction: float, total: int) -> int:
    """Images a fraction asks for; at least one when the fraction is positive, so that tiny
    folders still get a val/test split instead of silently an empty one."""
    if fraction <= 0:
        return 0
    return min(total, max(1, round(fraction * total)))


def _take(indices: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into ``count`` taken and the rest, stratified by label where possible.

    Stratifying keeps small val/test splits representative of every class; it is impossible when
    a class has a single image or a side is smaller than the number of classes, and then a plain
    seeded shuffle is used instead of failing.
    """
    if count <= 0:
        return indices[:0], indices
    if count >= len(indices):
        return indices, indices[:0]
    from sklearn.model_selection import train_test_split

    _, per_class = np.unique(labels, return_counts=True)
    classes = len(per_class)
    stratify = labels if per_class.min() >= 2 and min(count, len(indices) - count) >= classes else None
    rest, taken = train_test_split(indices, test_size=count, random_state=seed, shuffle=True, stratify=stratify)
    return np.asarray(taken), np.asarray(rest)


def _carve_val(
    labels: np.ndarray, val_fraction: float, max_train: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Val comes out of the training pool before subsetting, so ``max_train_samples`` only ever
    shrinks train and the val images do not depend on it."""
    pool = np.arange(len(labels))
    val, train = _take(pool, labels, _count(val_fraction, len(pool)), seed)
    if max_train is not None and max_train < len(train):
        train, _ = _take(train, labels[train], max_train, seed + 1)
    return train, val


def _check_not_empty(where: str, sizes: dict[str, int], config: DataConfig) -> None:
    """An empty split would only fail later, inside training or metrics, with an obscure error."""
    hints = {
        "train": "add images or lower data.val_fraction / data.test_fraction",
        "val": f"data.val_fraction={config.val_fraction} leaves no images; set it > 0 (students are ranked on val)",
        "test": f"data.test_fraction={config.test_fraction} leaves no images; set it > 0",
    }
    for name in SPLIT_NAMES:
        if sizes[name] == 0:
            raise XKDDataError(f"{where}: the {name} split is empty; {hints[name]}")


# ----------------------------------------------------------------------------- tensors


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear with antialiasing, so downsampling (28 -> 16) does not alias thin strokes."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _uint8_to_float(raw: torch.Tensor, indices: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [n, C, size, size] in [0, 1], chunk by chunk."""
    channels = 1 if raw.ndim == 3 else raw.shape[3]
    out = torch.empty((len(indices), channels, size, size), dtype=torch.float32)
    index = torch.as_tensor(indices, dtype=torch.long)
    for start in range(0, len(index), _CHUNK):
        chunk = raw[index[start : start + _CHUNK]]
        chunk = chunk.unsqueeze(1) if chunk.ndim == 3 else chunk.permute(0, 3, 1, 2)
        out[start : start + len(chunk)] = _resize(chunk.float().div_(255.0), size)
    return out


def _normalise(parts: dict[str, torch.Tensor]) -> None:
    """Standardise with train statistics only, so nothing about val/test leaks into training."""
    train = parts["train"].double()
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-6)
    mean, std = mean.float(), std.float()
    for images in parts.values():
        images.sub_(mean).div_(std)


def _assemble(
    name: str,
    where: str,
    config: DataConfig,
    images: dict[str, torch.Tensor],
    labels: dict[str, np.ndarray],
    class_names: Sequence[str],
) -> Splits:
    _check_not_empty(where, {split: len(labels[split]) for split in SPLIT_NAMES}, config)
    for split in SPLIT_NAMES:
        if len(labels[split]) and (labels[split].min() < 0 or labels[split].max() >= len(class_names)):
            raise XKDDataError(
                f"{where}: {split} labels fall outside 0..{len(class_names) - 1}; the dataset files look corrupted"
            )
    _normalise(images)
    parts = {
        split: Split(images[split].contiguous(), torch.as_tensor(labels[split], dtype=torch.int64).clone())
        for split in SPLIT_NAMES
    }
    return Splits(
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        num_classes=len(class_names),
        in_channels=int(parts["train"].images.shape[1]),
        image_size=config.image_size,
        name=name,
        class_names=tuple(str(c) for c in class_names),
    )


# ----------------------------------------------------------------------------- datasets


def _load_digits(config: DataConfig) -> Splits:
    """scikit-learn's 8x8 digits ship with the library: the offline default for tests and demos."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = np.asarray(bunch.target, dtype=np.int64)
    total = len(labels)
    test, pool = _take(np.arange(total), labels, _count(config.test_fraction, total), config.seed)
    val, train = _take(pool, labels[pool], _count(config.val_fraction, total), config.seed + 1)
    if config.max_train_samples is not None and config.max_train_samples < len(train):
        train, _ = _take(train, labels[train], config.max_train_samples, config.seed + 2)
    index = {"train": train, "val": val, "test": test}
    return _assemble(
        "digits",
        "digits",
        config,
        {
            split: _resize(images[torch.as_tensor(idx, dtype=torch.long)], config.image_size)
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
    train_idx, val_idx = _carve_val(train_labels, config.val_fraction, config.max_train_samples, config.seed)
    test_idx = np.arange(len(test_labels))
    size = config.image_size
    return _assemble(
        config.dataset,
        str(root),
        config,
        {
            "train": _uint8_to_float(train_raw, train_idx, size),
            "val": _uint8_to_float(train_raw, val_idx, size),
            "test": _uint8_to_float(test_raw, test_idx, size),
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
    train_idx, val_idx = _carve_val(train_labels, config.val_fraction, config.max_train_samples, config.seed)
    train_paths = [path for path, _ in train_set.samples]
    test_paths = [path for path, _ in test_set.samples]
    size = config.image_size
    return _assemble(
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
