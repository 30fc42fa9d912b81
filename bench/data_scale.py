"""Does streaming make data size a non-issue? Streamed vs in-memory at 1x, 4x, 16x the images.

ImageFolder trees are generated from scikit-learn's digits (PNG files at ``--size`` px; each
copy shifts every pixel value by the copy number, so no two files are byte-identical and the
duplicate check passes). For each size and each storage mode a fresh *trial process* (a
subprocess, as a Ray trial is) loads the data, runs one explanation pass of the teacher over
every split and one ``xd`` student epoch, and reports its peak RSS (``VmHWM``) and the epoch's
seconds. The *driver* (this process) never loads the data; its peak RSS is reported too.

The teacher is the product's VGG at its seed, untrained: an explanation pass costs the same
whatever the weights, and training it would time the teacher, not the data path. Augmentation
is off in both modes so the two time the same work.

RESULT keys: stream_rss_growth_16x (trial peak RSS at 16x / 1x, streamed),
stream_vs_memory_time_1x (s/epoch streamed / in memory at 1x), time_exponent (slope of
log s/epoch vs log images, streamed). Goals: <= 1.25, <= 1.3, 0.9-1.1.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def vm_hwm_mib() -> float:
    """Peak resident set of this process (includes pages of memory-mapped files while mapped)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_tree(root: Path, copies: int, size: int) -> int:
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    test = np.arange(len(bunch.target)) % 5 == 0
    count = 0
    for copy in range(copies):
        for index, (image, label) in enumerate(zip(bunch.images, bunch.target, strict=True)):
            folder = root / ("test" if test[index] else "train") / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(image / 16 * 240 + copy, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{index}_{copy}.png")
            count += 1
    return count


def trial(root: str, mode: str, size: int, cache: str) -> dict[str, float]:
    """One trial process: load, explain every split, train one xd epoch."""
    import torch

    from xkd_ray.config.schema import ExperimentConfig
    from xkd_ray.core.distill import build_student, epoch_loader, make_optimizer, train_one_epoch
    from xkd_ray.core.explain import cached_teacher_outputs, explain_settings
    from xkd_ray.core.models import build_teacher

    torch.set_num_threads(1)
    config = ExperimentConfig.model_validate(
        {
            "data": {"dataset": "imagefolder", "root": root, "image_size": size, "storage": mode, "augment": False},
            "teacher": {"width": 8},
            "explain": {"cache_dir": cache, "batch_size": 128},
            "distill": {"method": "xd", "epochs": 1, "batch_size": 64},
        }
    )
    started = time.perf_counter()
    torch.manual_seed(0)
    if mode == "stream":
        from xkd_ray.core.stream_run import StreamData, stream_loader
        from xkd_ray.core.streamed import stream_teacher_outputs
        from xkd_ray.data.streaming import stream_imagefolder

        splits = stream_imagefolder(config.data, cache)
    else:
        from xkd_ray.core.prepared import DistillData
        from xkd_ray.data.datasets import load_splits

        splits = load_splits(config.data)
    loaded = time.perf_counter()
    teacher = build_teacher("vgg", splits.in_channels, splits.num_classes, 8).eval()
    settings = explain_settings("gradcam", None, 32, 1.0)
    outputs = {}
    for name in ("train", "val", "test"):
        if mode == "stream":
            outputs[name], _ = stream_teacher_outputs(
                teacher,
                "bench",
                splits.split(name),
                name,
                splits.fingerprint(),
                settings,
                batch_size=128,
                cache_dir=cache,
            )
        else:
            outputs[name], _, _ = cached_teacher_outputs(
                teacher, "bench", splits.split(name).images, name, splits.fingerprint(), explainer="gradcam",
                layer=None, ig_steps=32, blur_sigma=1.0, batch_size=128, cache_dir=cache, progress=False,
            )  # fmt: skip
    explained = time.perf_counter()
    student = build_student(config, splits)
    optimizer, _ = make_optimizer(config, student)
    if mode == "stream":
        data = StreamData(splits, outputs, {}, {}, "bench", {})
        loader = stream_loader(config, data, 0)
    else:
        data = DistillData(splits, outputs, outputs["train"].maps.mean(0), {}, {}, "bench", {})
        loader = epoch_loader(config, data, 0)
    epoch_started = time.perf_counter()
    train_one_epoch(student, loader, optimizer, config, 0)
    finished = time.perf_counter()
    return {
        "load_s": loaded - started,
        "explain_s": explained - loaded,
        "epoch_s": finished - epoch_started,
        "train_images": len(splits.train),
        "peak_rss_mib": vm_hwm_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--scales", default="1,4,16", help="copies of digits' 1,797 images")
    parser.add_argument("--smoke", action="store_true", help="scales 1,2 at 16 px (a check that it runs)")
    parser.add_argument("--trial", nargs=4, metavar=("ROOT", "MODE", "SIZE", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        root, mode, size, cache = args.trial
        print(json.dumps(trial(root, mode, int(size), cache)))
        return
    if args.smoke:
        args.scales, args.size = "1,2", 16
    scales = [int(s) for s in args.scales.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="xkd-data-scale-") as work:
        for scale in scales:
            root = Path(work) / f"tree{scale}"
            images = write_tree(root, scale, args.size)
            for mode in ("stream", "memory"):
                cache = str(Path(work) / f"cache-{scale}-{mode}")
                command = [sys.executable, __file__, "--trial", str(root), mode, str(args.size), cache]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                found = json.loads(out.strip().splitlines()[-1])
                rows.append({"scale": scale, "images": images, "mode": mode, **found})
                print(
                    f"{scale:>3}x {images:>6} images {mode:>6}: load {found['load_s']:7.1f} s  explain "
                    f"{found['explain_s']:7.1f} s  epoch {found['epoch_s']:7.1f} s  trial peak RSS "
                    f"{found['peak_rss_mib']:7.0f} MiB  driver peak RSS {vm_hwm_mib():5.0f} MiB",
                    flush=True,
                )
    get = {(r["scale"], r["mode"]): r for r in rows}
    low, high = scales[0], scales[-1]
    growth = get[(high, "stream")]["peak_rss_mib"] / get[(low, "stream")]["peak_rss_mib"]
    memory_growth = get[(high, "memory")]["peak_rss_mib"] / get[(low, "memory")]["peak_rss_mib"]
    ratio = get[(low, "stream")]["epoch_s"] / get[(low, "memory")]["epoch_s"]
    x = np.log([get[(s, "stream")]["train_images"] for s in scales])
    y = np.log([get[(s, "stream")]["epoch_s"] for s in scales])
    exponent = float(np.polyfit(x, y, 1)[0])
    explain_exponent = float(np.polyfit(x, np.log([get[(s, "stream")]["explain_s"] for s in scales]), 1)[0])
    print(f"in-memory trial RSS growth {high}x/{low}x: {memory_growth:.2f} (for comparison)")
    print(f"explanation pass exponent (streamed): {explain_exponent:.2f}")
    print(f"driver peak RSS: {vm_hwm_mib():.0f} MiB (it never loads the data)")
    goals = {
        "stream_rss_growth": growth <= 1.25,
        "stream_vs_memory_time": ratio <= 1.3,
        "time_exponent": 0.9 <= exponent <= 1.1,
    }
    print("goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    print(
        f"RESULT stream_rss_growth_{high}x={growth:.3f} stream_vs_memory_time_{low}x={ratio:.3f} "
        f"time_exponent={exponent:.3f} driver_peak_rss_mib={vm_hwm_mib():.0f}"
    )
    assert math.isfinite(exponent)


if __name__ == "__main__":
    main()
