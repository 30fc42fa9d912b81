"""Teacher outputs and student batches for streamed data (``data.storage: stream``).

The teacher's logits and maps for a streamed split are written batch by batch into memory-mapped
``.npy`` arrays whose row is the image id (the row of the split's image shard), and read back per
batch: no process ever holds a whole split's maps. A memory map rather than Parquet shards because
a training batch is a random set of ids: a row of a fixed-size array is found by arithmetic,
where a Parquet row group must be decoded whole to get one row from it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from torch.utils.data.distributed import DistributedSampler

from xkd_ray.core.augment import AugmentCollate
from xkd_ray.core.explain import TeacherOutputs, explain_batch, teacher_cache_file
from xkd_ray.core.teacher_input import TeacherInput
from xkd_ray.data.streaming import StreamSplit
from xkd_ray.errors import XKDDataError


@dataclass(frozen=True)
class StreamTeacherOutputs:
    """One split's cached teacher outputs on disk: ``logits.npy`` [N, K], ``maps.npy`` [N, H, W]
    (float32, row = image id) and ``meta.json`` (degenerate count, the mean map)."""

    folder: str
    degenerate_maps: int
    template_map: torch.Tensor  # [H, W], the mean map of this split

    def read(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, maps) of these image ids, in the order given; the maps are unmapped after."""
        index = np.asarray(ids, dtype=np.int64)
        out = []
        for name in ("logits", "maps"):
            array = np.load(Path(self.folder) / f"{name}.npy", mmap_mode="r")
            out.append(torch.from_numpy(np.ascontiguousarray(array[index])))
            del array
        return out[0], out[1]

    @property
    def predictions(self) -> torch.Tensor:
        """The teacher's top-1 class per image (N int64s: small enough to hold)."""
        logits = np.load(Path(self.folder) / "logits.npy", mmap_mode="r")
        found = np.concatenate([logits[s : s + 4096].argmax(axis=1) for s in range(0, len(logits), 4096)])
        return torch.from_numpy(found.astype(np.int64))

    def whole(self) -> TeacherOutputs:
        """Every row in memory, for the whole-split metrics of val/test (train is never gathered)."""
        rows = len(np.load(Path(self.folder) / "logits.npy", mmap_mode="r"))
        logits, maps = self.read(np.arange(rows))
        return TeacherOutputs(logits, maps, self.degenerate_maps)


def _open(folder: Path) -> StreamTeacherOutputs:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        return StreamTeacherOutputs(
            str(folder), int(meta["degenerate_maps"]), torch.tensor(meta["template_map"], dtype=torch.float32)
        )
    except (OSError, KeyError, ValueError) as exc:
        raise XKDDataError(f"{folder}: streamed explanation cache is unreadable ({exc}); delete it") from exc


def stream_teacher_outputs(
    teacher: nn.Module,
    teacher_id: str,
    split: StreamSplit,
    split_name: str,
    data_fingerprint: str,
    settings: dict[str, Any],
    *,
    batch_size: int,
    cache_dir: str | Path,
    inputs: TeacherInput | None = None,
) -> tuple[StreamTeacherOutputs, bool]:
    """Read the split's cached outputs, or compute them one batch at a time and write each batch's
    rows straight into the arrays (atomic: a temporary folder renamed when complete).

    The cache key is the one the in-memory Parquet cache uses (teacher, explain settings, data,
    split), with its own folder name, so the two never read each other's files."""
    parquet = teacher_cache_file(cache_dir, teacher_id, settings, data_fingerprint, split_name)
    folder = parquet.with_name(parquet.stem + ".stream")
    if (folder / "meta.json").exists():
        return _open(folder), True
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        degenerate, total = 0, None
        for ids, images in split.batches(batch_size):
            logits, maps, count = explain_batch(teacher, images, settings, inputs)
            if total is None:
                shapes = {"logits": (len(split), logits.shape[1]), "maps": (len(split), *maps.shape[-2:])}
                for name, shape in shapes.items():
                    np.lib.format.open_memmap(temporary / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)
                total = torch.zeros(maps.shape[-2:], dtype=torch.float64)
            for name, values in (("logits", logits), ("maps", maps)):
                array = np.load(temporary / f"{name}.npy", mmap_mode="r+")
                array[ids[0] : ids[-1] + 1] = values.numpy()
                array.flush()
                del array
            degenerate += count
            total += maps.double().sum(dim=0)
        template = (total / max(len(split), 1)).float().tolist()
        meta = {"degenerate_maps": degenerate, "template_map": template, "split": split_name, **settings}
        (temporary / "meta.json").write_text(json.dumps(meta))
        temporary.rename(folder)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return _open(folder), False


class StreamDistillDataset:
    """Indexed by a *list* of image ids (one batch): returns (images, labels, teacher logits,
    teacher maps), read from the shards, augmented with one draw per image when asked."""

    def __init__(self, split: StreamSplit, outputs: StreamTeacherOutputs, augment: AugmentCollate | None) -> None:
        self.split, self.outputs, self.augment = split, outputs, augment

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, ids: list[int]) -> tuple[torch.Tensor, ...]:
        index = np.asarray(ids, dtype=np.int64)
        logits, maps = self.outputs.read(index)
        batch = (self.split.read(index), self.split.labels[torch.from_numpy(index)], logits, maps)
        return batch if self.augment is None else self.augment.augment(*batch)


def stream_epoch_loader(
    split: StreamSplit,
    outputs: StreamTeacherOutputs,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    augment: bool,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """The in-memory path's sampler (``DistributedSampler``, order fixed by seed and epoch), batched
    before reading so each step reads its rows in one go. No worker processes: reading a batch of
    uint8 rows costs a fraction of a student step (measured in bench/data_scale.py)."""
    sampler = DistributedSampler(range(len(split)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    dataset = StreamDistillDataset(split, outputs, AugmentCollate(seed, epoch) if augment else None)
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)
