"""Which reader should stream an image folder: our uint8 shard, a ``Dataset`` over the files, or Ray Data?

docs/DATA.md chose the uint8 shard read per batch (``xkd_ray.data.streaming.StreamSplit``). This
benchmark is the measurement behind that choice. On one ImageFolder tree (scikit-learn's digits
written as PNG files, ``--copies`` shifted copies, at ``--size`` px) each reader delivers two
shuffled epochs of normalised float32 batches of 64 train images with their labels, with no
model: what is timed is the data path alone, the part a reader adds to every epoch.

Readers (each in a fresh subprocess, so its peak RSS is its own):

The shard holds the train split after the validation images are carved out of ``train/``; the
file readers read the whole ``train/`` folder, so readers are compared per image, not per epoch.

* ``shard``: the product's reader; the tree is decoded once into the shard (its cost is printed
  as ``build_s``, paid once per tree), then each batch reads its rows from a memory map.
* ``files_w0`` / ``files_w2``: a torch ``Dataset`` over the file paths (PIL decode, RGB, bilinear
  resize, normalise) under a ``DataLoader`` with 0 and 2 worker processes.
* ``raydata_files``: ``ray.data.read_images`` of the train folder (resized on read) and
  ``iter_torch_batches`` with a local shuffle buffer, on a local Ray with 2 CPUs.
* ``raydata_shard``: ``ray.data.read_numpy`` of the same uint8 shard and ``iter_torch_batches``.

Ray Data's blocks live in the object store and its reads run in Ray worker processes, so the
peak RSS printed for the two Ray Data readers is the reading process only; the object store's
share is not in it. Epoch 1 includes start-up (worker spawn, Ray Data's planning); epoch 2 is the
steady state every later epoch pays.

RESULT keys: ``files_w0_vs_shard``, ``files_w2_vs_shard``, ``raydata_files_vs_shard``,
``raydata_shard_vs_shard`` (epoch-2 seconds per image of each reader / the shard's; above 1 means
slower than the shard reader), ``shard_images_per_s``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from data_scale import vm_hwm_mib, write_tree  # the same tree and RSS probe as data_scale (this folder is on sys.path)

READERS = ("shard", "files_w0", "files_w2", "raydata_files", "raydata_shard")
BATCH = 64


def _normalise(images, mean, std):
    """uint8 [B, C, S, S] -> float32 normalised with the train statistics (as StreamSplit.read)."""
    images = images.float().div_(255.0)
    return images.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def _epochs(batches_for_epoch, epochs: int = 2) -> tuple[list[float], int]:
    seconds, seen = [], 0
    for epoch in range(epochs):
        started = time.perf_counter()
        seen = 0
        for images, labels in batches_for_epoch(epoch):
            assert images.dtype.is_floating_point and len(images) == len(labels)
            seen += len(labels)
        seconds.append(time.perf_counter() - started)
    return seconds, seen


def run_reader(reader: str, root: str, size: int, cache: str) -> dict[str, float]:
    import torch

    from xkd_ray.config.schema import DataConfig
    from xkd_ray.data.streaming import stream_imagefolder

    torch.set_num_threads(1)
    config = DataConfig.model_validate({"dataset": "imagefolder", "root": root, "image_size": size, "augment": False})
    started = time.perf_counter()
    splits = stream_imagefolder(config, cache)  # the shard (and the file list, labels, statistics)
    build_s = time.perf_counter() - started
    train = splits.train
    mean, std = torch.tensor(train.mean), torch.tensor(train.std)
    count = len(train)

    if reader == "shard":

        def batches(epoch):
            order = np.random.default_rng(epoch).permutation(count)
            for start in range(0, count, BATCH):
                ids = order[start : start + BATCH]
                yield train.read(ids), train.labels[ids]

    elif reader.startswith("files_"):
        from PIL import Image
        from torch.utils.data import DataLoader, Dataset

        from xkd_ray.data.datasets import _scan_folder

        classes, samples = _scan_folder(Path(root) / "train")
        files = [path for path, _ in samples]
        labels = [label for _, label in samples]

        class Files(Dataset):
            def __len__(self):
                return len(files)

            def __getitem__(self, index):
                with Image.open(files[index]) as image:
                    pixels = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                return torch.from_numpy(np.asarray(pixels).transpose(2, 0, 1).copy()), labels[index]

        workers = int(reader[-1])
        loader = DataLoader(
            Files(), batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0
        )

        def batches(epoch):
            for images, label in loader:
                yield _normalise(images, mean, std), label

    else:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        if reader == "raydata_files":
            from xkd_ray.data.datasets import _scan_folder

            classes, _ = _scan_folder(Path(root) / "train")
            index = {name: i for i, name in enumerate(classes)}

            def labelled(batch):  # runs in Ray Data's workers, as a user's labelling step would
                labels = np.array([index[Path(path).parent.name] for path in batch.pop("path")], dtype=np.int64)
                return {"image": batch["image"], "label": labels}

            dataset = ray.data.read_images(str(Path(root) / "train"), size=(size, size), mode="RGB", include_paths=True)
            dataset = dataset.map_batches(labelled, batch_format="numpy")

            def to_batch(batch):
                return batch["image"].permute(0, 3, 1, 2), batch["label"]

            column = None
        else:
            dataset = ray.data.read_numpy(train.path)
            column = "data"

            def to_batch(batch):
                return torch.as_tensor(batch[column]), torch.zeros(len(batch[column]), dtype=torch.int64)

        def batches(epoch):
            for batch in dataset.iter_torch_batches(
                batch_size=BATCH, local_shuffle_buffer_size=4 * BATCH, local_shuffle_seed=epoch, dtypes=None
            ):
                images, labels = to_batch(batch)
                yield _normalise(images, mean, std), labels

    seconds, seen = _epochs(batches)
    expected = count if reader in ("shard", "raydata_shard") else len(list((Path(root) / "train").rglob("*.png")))
    assert seen == expected, f"{reader}: {seen} images in an epoch, expected {expected}"
    return {
        "build_s": build_s,
        "epoch1_s": seconds[0],
        "epoch2_s": seconds[1],
        "images": seen,
        "peak_rss_mib": vm_hwm_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="shifted copies of digits' 1,797 images")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--readers", default=",".join(READERS))
    parser.add_argument("--smoke", action="store_true", help="1 copy at 16 px (a check that it runs)")
    parser.add_argument("--reader", nargs=4, metavar=("NAME", "ROOT", "SIZE", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        name, root, size, cache = args.reader
        print(json.dumps(run_reader(name, root, int(size), cache)))
        return
    if args.smoke:
        args.copies, args.size = 1, 16
    readers = args.readers.split(",")
    found: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="xkd-data-readers-") as work:
        root = Path(work) / "tree"
        write_tree(root, args.copies, args.size)
        for name in readers:
            cache = str(Path(work) / "cache")  # shared: the shard is built by the first reader
            command = [sys.executable, __file__, "--reader", name, str(root), str(args.size), cache]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"reader {name} failed:\n{done.stderr[-3000:]}")
            found[name] = json.loads(done.stdout.strip().splitlines()[-1])
            row = found[name]
            print(
                f"{name:>14}: {row['images']:.0f} train images  epoch 1 {row['epoch1_s']:6.2f} s  epoch 2 "
                f"{row['epoch2_s']:6.2f} s  ({row['images'] / row['epoch2_s']:8.0f} images/s)  peak RSS "
                f"{row['peak_rss_mib']:5.0f} MiB  scan (first reader: + decode) {row['build_s']:.1f} s",
                flush=True,
            )
    per_image = {name: row["epoch2_s"] / row["images"] for name, row in found.items()}
    others = [name for name in readers if name != "shard"]
    ratios = " ".join(f"{name}_vs_shard={per_image[name] / per_image['shard']:.2f}" for name in others)
    print(f"RESULT {ratios} shard_images_per_s={1 / per_image['shard']:.0f}")


if __name__ == "__main__":
    main()
