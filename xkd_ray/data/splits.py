"""The three splits as in-memory tensors, fixed by a seed and fingerprinted.

Teacher, explanations and every student in a search must see exactly the same images, so the
splits are computed once, deterministically, and fingerprinted: the fingerprint keys the teacher
checkpoint and the explanation cache, so a change in the data can never reuse a stale artefact.
The datasets are small enough to live in memory as one float tensor per split, which keeps the
training loops free of per-item decoding and makes the data trivially shareable (``ray.put``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from xkd_ray.errors import XKDDataError

if TYPE_CHECKING:
    from xkd_ray.config.schema import DataConfig

SPLIT_NAMES = ("train", "val", "test")
# Converting a whole torchvision split at once would briefly hold several float copies of it
# (CIFAR-10 train alone is 600 MB as float32); chunks bound that peak.
_CHUNK = 8192


class ZeroCopyPickle:
    """Mixin for the dataclasses of tensors that trials share (``Split``, ``TeacherOutputs``,
    ``DistillData``): they pickle their tensors as NumPy arrays. Ray's object store keeps NumPy
    arrays out of band and hands every process on a node a read-only view of the node's one copy
    (zero-copy), where a pickled torch tensor is copied into each process that reads it: with
    this, a search's prepared data costs one copy per node, not one per trial process, and
    ``ray.put`` writes the arrays straight into the store instead of pickling them to bytes first.
    Ray's own switch for torch tensors (``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS``) is experimental,
    job-wide and read when ``ray`` is imported, so these few classes opt in themselves."""

    def __reduce__(self) -> tuple[Any, ...]:
        state = {item.name: _to_arrays(getattr(self, item.name)) for item in fields(self) if item.init}  # type: ignore[arg-type]
        return (_rebuild, (type(self), state))


def _to_arrays(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    if isinstance(value, dict):
        return {key: _to_arrays(item) for key, item in value.items()}
    return value


def _to_tensors(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        with warnings.catch_warnings():  # a read-only view of the object store: nothing writes prepared data in place
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(value)
    if isinstance(value, dict):
        return {key: _to_tensors(item) for key, item in value.items()}
    return value


def _rebuild(cls: type, state: dict[str, Any]) -> Any:
    return cls(**{name: _to_tensors(value) for name, value in state.items()})


@dataclass(frozen=True, eq=False)
class Split(ZeroCopyPickle):
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
    # How raw images became these tensors, saved with every student (``xkd_ray.student.preprocessing``)
    # so it can be applied to new images: the train split's per-channel mean and std, the raw value
    # of full intensity (16 in scikit-learn's digits, 255 in 8-bit images) and the resize rule.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    pixel_max: float = 255.0
    resize_rule: str = "torch_bilinear_antialias"  # or "pil_bilinear" (image folders: PIL resizes the files)
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


def count_for(fraction: float, total: int) -> int:
    """Images a fraction asks for; at least one when the fraction is positive, so that tiny
    folders still get a val/test split instead of silently an empty one."""
    if fraction <= 0:
        return 0
    return min(total, max(1, round(fraction * total)))


def take(indices: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
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


def carve_val(
    labels: np.ndarray, val_fraction: float, max_train: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Val comes out of the training pool before subsetting, so ``max_train_samples`` only ever
    shrinks train and the val images do not depend on it."""
    pool = np.arange(len(labels))
    val, train = take(pool, labels, count_for(val_fraction, len(pool)), seed)
    if max_train is not None and max_train < len(train):
        train, _ = take(train, labels[train], max_train, seed + 1)
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


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear with antialiasing, so downsampling (28 -> 16) does not alias thin strokes."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def uint8_to_float(raw: torch.Tensor, indices: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [n, C, size, size] in [0, 1], chunk by chunk."""
    channels = 1 if raw.ndim == 3 else raw.shape[3]
    out = torch.empty((len(indices), channels, size, size), dtype=torch.float32)
    index = torch.as_tensor(indices, dtype=torch.long)
    for start in range(0, len(index), _CHUNK):
        chunk = raw[index[start : start + _CHUNK]]
        chunk = chunk.unsqueeze(1) if chunk.ndim == 3 else chunk.permute(0, 3, 1, 2)
        out[start : start + len(chunk)] = resize(chunk.float().div_(255.0), size)
    return out


def _normalise(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise with train statistics only, so nothing about val/test leaks into training;
    returns the float32 mean and std used (saved with every student)."""
    train = parts["train"].double()
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-6)
    mean, std = mean.float(), std.float()
    for images in parts.values():
        images.sub_(mean).div_(std)
    return mean.flatten(), std.flatten()


def assemble(
    name: str,
    where: str,
    config: DataConfig,
    images: dict[str, torch.Tensor],
    labels: dict[str, np.ndarray],
    class_names: Sequence[str],
    *,
    pixel_max: float = 255.0,
    resize_rule: str = "torch_bilinear_antialias",
) -> Splits:
    _check_not_empty(where, {split: len(labels[split]) for split in SPLIT_NAMES}, config)
    for split in SPLIT_NAMES:
        if len(labels[split]) and (labels[split].min() < 0 or labels[split].max() >= len(class_names)):
            raise XKDDataError(
                f"{where}: {split} labels fall outside 0..{len(class_names) - 1}; the dataset files look corrupted"
            )
    mean, std = _normalise(images)
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
        mean=tuple(float(value) for value in mean.tolist()),
        std=tuple(float(value) for value in std.tolist()),
        pixel_max=float(pixel_max),
        resize_rule=resize_rule,
    )
