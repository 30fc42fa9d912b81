"""How does the cost of one `xd` epoch grow with the data and the image size, and where does it go?

* Dataset size: digits' training split repeated 1x, 2x, 4x, 8x (same per-image work).
* Image size: 32 and 64 pixels.
For each: wall time of one training epoch plus the validation pass, and the peak resident
memory growth; the growth exponent is the slope of log(time) against log(size). A
torch.profiler run of one epoch then splits the time into data loading, student forward,
explanation loss, backward + optimiser step, and metrics.
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from train_overhead import repeat_train  # bench/ is on sys.path when run as a script

from xkd_ray.config.methods import METHODS
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.distill import build_student, evaluate, make_optimizer
from xkd_ray.core.losses import distillation_loss
from xkd_ray.core.prepared import DistillData, prepare

PHASES = (
    "data: batch + cached teacher outputs",
    "student forward",
    "losses (CE + KD + explanation)",
    "backward + optimiser step",
    "metrics (val, incl. post-hoc Grad-CAM)",
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_epoch(config: ExperimentConfig, data: DistillData) -> float:
    """One epoch with each phase labelled, so the profiler can attribute the time."""
    torch.manual_seed(0)
    student = build_student(config, data.splits)
    optimizer, _ = make_optimizer(config, student)
    settings = config.distill
    # The same weights as `train_one_epoch` (the method is `xd`: no term needs the live teacher or student CAMs).
    weights = METHODS[settings.method].loss_weights(
        settings.alpha, settings.beta, settings.at_weight, settings.e2kd_weight
    )
    train, outputs = data.splits.train, data.teacher_outputs["train"]
    started = time.perf_counter()
    order = torch.randperm(len(train))
    for batch in order.split(settings.batch_size):
        with record_function(PHASES[0]):
            images, labels = train.images[batch], train.labels[batch]
            teacher_logits, teacher_maps = outputs.logits[batch], outputs.maps[batch]
        with record_function(PHASES[1]):
            result = student(images, return_all=True)
        with record_function(PHASES[2]):
            parts = distillation_loss(
                result.logits, labels, teacher_logits, temperature=settings.temperature, **weights,
                predicted_maps=result.maps, teacher_maps=teacher_maps, explanation_kind=settings.explanation_loss,
            )  # fmt: skip
        with record_function(PHASES[3]):
            optimizer.zero_grad(set_to_none=True)
            parts["total"].backward()
            optimizer.step()
    with record_function(PHASES[4]):
        # An ordinary epoch's validation pass: without the end-of-run faithfulness measurements.
        evaluate(student, data, "val", config, diagnostics=False)
    return time.perf_counter() - started


def exponent(sizes: list[float], seconds: list[float]) -> float:
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    base = ExperimentConfig().with_overrides({"distill.method": "xd"})
    repeats, image_sizes = [1, 2, 4, 8], [32, 64]
    if args.smoke:
        base = base.with_overrides(
            {"data.image_size": 16, "teacher.width": 8, "teacher.epochs": 1, "explain.cache_dir": ".xkd_cache/smoke"}
        )
        repeats, image_sizes = [1, 2], [16, 32]
    data = prepare(base, progress=False)
    data_seconds = []
    for times in repeats:
        before = peak_rss_mib()
        seconds = one_epoch(base, repeat_train(data, times))
        data_seconds.append(seconds)
        print(
            f"data x{times}: {seconds:6.2f} s/epoch, peak RSS {peak_rss_mib():.0f} MiB (+{peak_rss_mib() - before:.0f})"
        )
    size_seconds = []
    for size in image_sizes:
        config = base.with_overrides({"data.image_size": size})
        sized = prepare(config, progress=False)
        seconds = one_epoch(config, sized)
        size_seconds.append(seconds)
        print(f"image {size}x{size}: {seconds:6.2f} s/epoch, peak RSS {peak_rss_mib():.0f} MiB")
    data_exponent = exponent(repeats, data_seconds)
    pixel_exponent = exponent([s * s for s in image_sizes], size_seconds)
    print(f"time ~ data^{data_exponent:.2f}, time ~ pixels^{pixel_exponent:.2f}")

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        one_epoch(base, data)
    labelled = [e for e in profiler.key_averages() if e.key in PHASES]
    total = sum(e.cpu_time_total for e in labelled) or 1.0
    print("where one epoch's time goes (torch.profiler, CPU):")
    for event in sorted(labelled, key=lambda e: -e.cpu_time_total):
        print(f"  {event.key:42s} {event.cpu_time_total / 1e6:6.2f} s  {100 * event.cpu_time_total / total:5.1f}%")
    print(f"RESULT data_exponent={data_exponent:.2f} pixel_exponent={pixel_exponent:.2f}")


if __name__ == "__main__":
    main()
