"""Image folders larger than memory: decoded once into uint8 shard files, read one batch at a time.

Why this format and not Ray Data or a ``Dataset`` over the image files (see docs/DATA.md):

* Decoding and resizing a PNG/JPEG costs far more than one student step on a small image; a
  ``Dataset`` over file paths pays it every epoch, and on a few cores DataLoader worker processes
  cannot hide it. So each split is decoded **once** into a raw ``uint8 [N, C, S, S]`` ``.npy``
  file (4x smaller than float32), and an epoch only reads rows back.
* Each batch opens the file as a memory map, copies its rows out (sorted, so reads are mostly
  sequential) and drops the map, so the reader's resident memory stays one batch, whatever N is.
  Normalisation (train-split mean/std, as in memory) is applied per batch.
* It is plain NumPy and torch: the student loop, the teacher loop and the explanation pass share
  it in any process (a Ray trial, a Ray Train worker, ``xkd distill``) without Ray Data's
  executor, and a row is addressed by its image id, the key of the teacher's cached maps.

The shard folder is keyed by a hash of the file list (paths, sizes, mtimes), the image size and
the split settings, so a changed file or setting gives a new folder; it is written under a
temporary name and renamed, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xkd_ray.data.splits import SPLIT_NAMES, Splits
from xkd_ray.errors import XKDConfigError, XKDDataError

if TYPE_CHECKING:
    from xkd_ray.config.schema import DataConfig
    from xkd_ray.config.space import SearchSpec

logger = logging.getLogger(__name__)

STREAM_FORMAT_VERSION = 1
_DECODE_CHUNK = 512  # images decoded per write into the shard (bounds the decoder's memory)
_FLOAT_BYTES = 4


def decoded_megabytes(images: int, channels: int, size: int) -> float:
    """What a dataset costs in memory on today's path: float32 [N, C, S, S]."""
    return images * channels * size * size * _FLOAT_BYTES / 2**20


def resolve_storage(config: DataConfig, images: int, channels: int) -> str:
    """``memory`` or ``stream`` for ``data.storage`` (``auto``: stream above the threshold)."""
    if config.storage != "auto":
        return config.storage
    return "stream" if decoded_megabytes(images, channels, config.image_size) > config.stream_threshold_mb else "memory"


def storage_for(config: DataConfig) -> str:
    """Where this config's data is read from, ``auto`` resolved by the size the in-memory path would
    take (a directory scan, no decoding). Streamed image folders are always decoded to RGB."""
    if config.dataset != "imagefolder" or config.storage != "auto":
        return "memory" if config.dataset != "imagefolder" else config.storage
    from xkd_ray.data.datasets import _root, _scan_folder

    root = _root(config, may_create=False)
    images = sum(len(_scan_folder(root / name)[1]) for name in ("train", "test"))
    return resolve_storage(config, images, 3)


def check_stream_search(spec: SearchSpec, remote: bool) -> str:
    """The storage a search's data resolves to (``storage_for``: one folder scan). A search over
    streamed data (trials read the shards and maps the driver wrote under ``explain.cache_dir``,
    never a whole split) is refused, before anything is written, where that cannot hold: a method
    the search may train that needs the live teacher's features (streamed batches carry only its
    cached logits and maps), or object storage as ``--out``."""
    from xkd_ray.config.methods import METHODS

    storage = storage_for(spec.base.data)
    if storage != "stream":
        return storage
    sampled = spec.parameters.get("distill.method")
    methods = {spec.base.distill.method, *(sampled.probes() if sampled is not None else [])}
    methods |= {given.get("distill.method", spec.base.distill.method) for given in spec.search.cli_point_givens()}
    needs_teacher = {name for name, method in METHODS.items() if method.needs_teacher}
    live = sorted(methods & needs_teacher)
    if live:
        raise XKDConfigError(
            f"distill.method: {', '.join(live)} train on the live teacher, which streamed data "
            "(data.storage resolved to stream) does not carry; drop it from the space or use data.storage=memory"
        )
    if remote:
        raise XKDConfigError(
            "--out: streamed shards are read from explain.cache_dir on the nodes' shared disk, not from "
            "object storage; use a shared folder for --out, or data.storage=memory"
        )
    return storage


def split_images(split: Any, rows: slice) -> torch.Tensor:
    """Rows of a split's normalised images: sliced from memory, or read from a streamed split's
    shard (``StreamSplit``; evaluation of val/test only, train is never gathered)."""
    images = getattr(split, "images", None)
    if images is not None:
        return images[rows]
    return split.read(np.arange(rows.start, rows.stop))


@dataclass(frozen=True)
class StreamSplit:
    """One split on disk: ``images.npy`` (uint8 [N, C, S, S]) plus labels kept in memory (8 bytes
    an image). Pickles as its path, so sending it to a Ray task ships no pixels."""

    path: str  # the split's .npy file
    labels: torch.Tensor  # int64 [N]
    mean: tuple[float, ...]  # per channel, of the train split, in [0, 1] units
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised float32 [B, C, S, S] for these image ids, in the order given."""
        index = np.asarray(indices, dtype=np.int64)
        order = np.argsort(index, kind="stable")
        shard = np.load(self.path, mmap_mode="r")
        rows = np.empty((len(index), *shard.shape[1:]), dtype=np.uint8)
        rows[order] = shard[index[order]]  # sorted reads, then back to the caller's order
        del shard  # unmap: the pages read do not stay resident in this process
        images = torch.from_numpy(rows).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return images.sub_(mean).div_(std)

    def batches(self, batch_size: int):
        """(ids, images) in order: for the explanation pass and evaluation."""
        for start in range(0, len(self), batch_size):
            ids = np.arange(start, min(start + batch_size, len(self)))
            yield ids, self.read(ids)


@dataclass(frozen=True)
class StreamSplits:
    """The three splits of a streamed dataset, with what models need (as ``Splits``)."""

    train: StreamSplit
    val: StreamSplit
    test: StreamSplit
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    class_names: tuple[str, ...]
    fingerprint_value: str

    def split(self, name: str) -> StreamSplit:
        if name not in SPLIT_NAMES:
            raise XKDDataError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def fingerprint(self) -> str:
        """Keys the teacher and its maps, as ``Splits.fingerprint`` does (here: of the files, not
        of the decoded tensors, which are never all in one process)."""
        return self.fingerprint_value

    def describe(self) -> dict[str, Any]:
        return {**Splits.describe(self), "storage": "stream"}  # type: ignore[arg-type] (the same fields)

    # What a saved student records as its preprocessing (xkd_ray.student.preprocessing): the train
    # split's statistics, and the shard's decoding (PIL bilinear to RGB, 8-bit pixels).
    @property
    def mean(self) -> tuple[float, ...]:
        return self.train.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.train.std

    pixel_max = 255.0
    resize_rule = "pil_bilinear"


def _decode_into(path: Path, files: Sequence[str], size: int) -> np.ndarray:
    """Decode ``files`` to RGB at ``size`` into a new uint8 shard; returns per-channel (sum, sum of
    squares) in [0, 1] units so the train statistics need no second pass."""
    from PIL import Image

    shard = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(files), 3, size, size))
    moments = np.zeros((2, 3), dtype=np.float64)
    for start in range(0, len(files), _DECODE_CHUNK):
        chunk = np.empty((min(_DECODE_CHUNK, len(files) - start), 3, size, size), dtype=np.uint8)
        for row, file in enumerate(files[start : start + len(chunk)]):
            try:
                with Image.open(file) as image:
                    pixels = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                    chunk[row] = np.asarray(pixels).transpose(2, 0, 1)
            except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for broken files
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise XKDDataError(f"{file}: cannot read image ({reason}); fix or delete the file") from exc
        shard[start : start + len(chunk)] = chunk
        values = chunk.astype(np.float64) / 255.0
        moments[0] += values.sum(axis=(0, 2, 3))
        moments[1] += np.square(values).sum(axis=(0, 2, 3))
    shard.flush()
    del shard
    return moments


def _file_list_key(config: DataConfig, files: dict[str, list[str]], labels: dict[str, np.ndarray]) -> str:
    listing = {
        split: [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in paths] for split, paths in files.items()
    }
    record = {
        "version": STREAM_FORMAT_VERSION,
        "files": listing,
        "labels": {split: labels[split].tolist() for split in SPLIT_NAMES},
        "size": config.image_size,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def stream_imagefolder(config: DataConfig, cache_dir: str | Path) -> StreamSplits:
    """Scan and split an ImageFolder tree exactly as the in-memory loader does (same classes,
    same val carve, same duplicate refusal or dropping), then decode each split once into its shard."""
    from xkd_ray.data.datasets import _root, _scan_folder
    from xkd_ray.data.duplicates import drop_duplicates, refuse_duplicates
    from xkd_ray.data.splits import carve_val

    if config.dataset != "imagefolder":
        raise XKDDataError(f"data.storage: stream reads image folders only; {config.dataset!r} loads in memory")
    root = _root(config, may_create=False)
    classes, train_samples = _scan_folder(root / "train")
    test_classes, test_samples = _scan_folder(root / "test")
    if classes != test_classes:
        raise XKDDataError(f"{root}: class folders differ between train/ and test/")
    if config.duplicates == "drop":
        train_samples, test_samples, _ = drop_duplicates(root, train_samples, test_samples)
    train_labels = np.asarray([label for _, label in train_samples], dtype=np.int64)
    train_idx, val_idx = carve_val(train_labels, config.val_fraction, config.max_train_samples, config.seed)
    files = {
        "train": [train_samples[i][0] for i in train_idx],
        "val": [train_samples[i][0] for i in val_idx],
        "test": [path for path, _ in test_samples],
    }
    labels = {
        "train": train_labels[train_idx],
        "val": train_labels[val_idx],
        "test": np.asarray([label for _, label in test_samples], dtype=np.int64),
    }
    for name in SPLIT_NAMES:
        if len(files[name]) == 0:
            raise XKDDataError(f"{root}: the {name} split is empty; add images or lower data.val_fraction")
    refuse_duplicates(root, files)
    key = _file_list_key(config, files, labels)
    folder = Path(cache_dir) / "streams" / f"imagefolder-{key}"
    if not (folder / "meta.json").exists():
        _build(folder, files, config.image_size)
    meta = json.loads((folder / "meta.json").read_text())
    parts = {
        name: StreamSplit(
            str(folder / f"{name}.npy"),
            torch.as_tensor(labels[name], dtype=torch.int64),
            tuple(meta["mean"]),
            tuple(meta["std"]),
        )
        for name in SPLIT_NAMES
    }
    return StreamSplits(
        **parts,
        num_classes=len(classes),
        in_channels=3,
        image_size=config.image_size,
        name="imagefolder",
        class_names=tuple(classes),
        fingerprint_value=key,
    )


def _build(folder: Path, files: dict[str, list[str]], size: int) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        moments = {name: _decode_into(temporary / f"{name}.npy", files[name], size) for name in SPLIT_NAMES}
        count = len(files["train"]) * size * size
        mean = moments["train"][0] / count
        std = np.sqrt(np.maximum(moments["train"][1] / count - mean**2, 0.0)).clip(min=1e-6)
        meta = {"mean": mean.tolist(), "std": std.tolist(), "sizes": {k: len(v) for k, v in files.items()}}
        (temporary / "meta.json").write_text(json.dumps(meta))
        try:
            temporary.rename(folder)
        except OSError:  # another process finished the same folder first: theirs is identical
            logger.info("stream shards %s were written concurrently; keeping the first", folder)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
