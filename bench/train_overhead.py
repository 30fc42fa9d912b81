"""What does Ray Train cost per epoch, and how well do 2 workers scale?

One run, one config (an `xd` student on digits upsampled to 64x64 and repeated so a plain
epoch takes ~10 s here), each epoch including the full validation pass:
  * plain single-process loop vs Ray Train with 1 worker: per-epoch wall-time ratio
    (Ray start-up reported separately);
  * 2 workers x 1 torch thread vs 1 worker x 1 thread: scaling efficiency T1 / (2 * T2).
Per-epoch times are the spacing of the epochs' end timestamps (first epoch excluded: warm-up).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import tempfile
import time

import torch

from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.distill import distill
from xkd_ray.core.explain import TeacherOutputs
from xkd_ray.core.prepared import DistillData, prepare
from xkd_ray.data.datasets import Split


def repeat_train(data: DistillData, times: int) -> DistillData:
    """The same images several times: a bigger epoch with identical per-step work."""
    train, outputs = data.splits.train, data.teacher_outputs["train"]
    splits = dataclasses.replace(
        data.splits, train=Split(train.images.repeat(times, 1, 1, 1), train.labels.repeat(times))
    )
    repeated = TeacherOutputs(
        outputs.logits.repeat(times, 1), outputs.maps.repeat(times, 1, 1), outputs.degenerate_maps
    )
    return dataclasses.replace(data, splits=splits, teacher_outputs={**data.teacher_outputs, "train": repeated})


def epoch_seconds(history: list[dict]) -> float:
    stamps = [h["wall_time"] for h in history]
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    overrides = {"data.image_size": 64, "student.width": 16, "distill.epochs": args.epochs}
    if args.smoke:
        overrides = {"data.image_size": 16, "teacher.width": 8, "teacher.epochs": 1, "student.width": 8}
        overrides |= {"distill.epochs": 3, "explain.cache_dir": ".xkd_cache/smoke"}
        args.repeat = 1
    config = ExperimentConfig().with_overrides(overrides)
    data = repeat_train(prepare(config, progress=False), args.repeat)

    import ray

    from xkd_ray.cluster.ray_run import distill_with_ray

    storage = tempfile.mkdtemp(prefix="xkd-bench-")
    plain_seconds = epoch_seconds(distill(config, data, progress=False, evaluate_every_epoch=True)[1]["history"])
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray_start = time.perf_counter() - started

    def ray_run(workers: int, threads: int, cpus: float) -> tuple[float, float]:
        run_config = config.with_overrides(
            {"ray.num_workers": workers, "ray.threads_per_worker": threads, "ray.cpus_per_worker": cpus}
        )
        started = time.perf_counter()
        _, metrics = distill_with_ray(run_config, data, storage_path=storage)
        total = time.perf_counter() - started
        history = metrics["history"]
        return epoch_seconds(history), total - (history[-1]["wall_time"] - history[0]["wall_time"])

    # Same cores as the plain loop: one worker holding every CPU and as many torch threads
    # (Ray otherwise sets a worker's thread count from its CPU share).
    cores = os.cpu_count() or 1
    one_worker, one_worker_startup = ray_run(1, cores, cores)
    one_thread, _ = ray_run(1, 1, 0.9)
    two_workers, _ = ray_run(2, 1, 0.9)
    overhead = one_worker / plain_seconds
    efficiency = one_thread / (2 * two_workers)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {len(data.splits.train)} train images/epoch")
    print(f"plain loop            {plain_seconds:7.2f} s/epoch  ({torch.get_num_threads()} torch threads)")
    print(f"Ray Train, 1 worker   {one_worker:7.2f} s/epoch  ({cores} threads; ratio {overhead:.3f})")
    print(f"Ray start-up          {ray_start:7.2f} s; trainer start-up + first epoch {one_worker_startup:.2f} s")
    print(f"1 worker x 1 thread   {one_thread:7.2f} s/epoch")
    print(f"2 workers x 1 thread  {two_workers:7.2f} s/epoch  (scaling efficiency {efficiency:.3f})")
    ray.shutdown()
    print(f"RESULT overhead_ratio={overhead:.3f} scaling_efficiency={efficiency:.3f}")


if __name__ == "__main__":
    main()
