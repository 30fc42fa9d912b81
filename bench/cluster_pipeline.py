"""What does moving the teacher's pipeline onto Ray workers (xkd_ray/cluster/ray_teacher.py) cost and gain?

Config and budget (about 5-8 minutes on a 2-core CPU machine; ``--smoke``: under 2 minutes):
  (a) teacher: digits at 16x16, VGG width 16, 5 epochs (batch 64), trained by the plain loop
      (``teacher.train_teacher`` + save) and by Ray Train on 1 worker (``train_teacher_with_ray``),
      each into a fresh cache, on an already started local Ray: the wall-time ratio is Ray Train's
      overhead (worker start-up, checkpoints every epoch, reports), split into fixed and per-epoch;
  (b) the teacher's Integrated Gradients (32 steps) on every split of (a)'s data: in this process
      (``explain.cached_teacher_outputs``), then as the Ray actor job on 1 and on 2 workers
      (``explain_on_workers``, actor start-up included): speed-up and scaling efficiency
      (speed-up / 2) of 2 workers over 1;
  (c) the driver's peak memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of a fresh driver
      process, one per path, joined to the same Ray) of ``prepare`` vs ``prepare_on_workers``
      (2 workers) on digits "scaled x8": no dataset setting repeats images, so the images are
      enlarged from the default 32x32 to 92x92 (8.27x the pixels, hence of the tensors, the
      maps and the activations; 91 is refused: the student's autoencoder needs a multiple of 4),
      teacher width 8, 2 epochs, Grad-CAM;
  (d) data to trials, before / after ``splits.ZeroCopyPickle``, on (c)'s data with warm caches, each
      in a fresh driver: ``prepare_on_workers`` then ``ray.put`` of the bundle as a search does, the
      bundle's tensors pickled as torch tensors (before: how ``DistillData`` was serialised) or as
      NumPy arrays (after), the driver keeping (before) or dropping (after) its own bundle; then 2
      trial-like Ray tasks on the node each ``ray.get`` it and report the private memory (USS) the
      read added to their process. RESULT: the driver's peak RSS before/after and the per-trial
      private copy before/after.
The machine may be shared: each part prints the 1-minute load average when it ends, since
timings on 2 cores are only comparable at a similar load.
Each part prints a ``RESULT key=value ...`` line; the last line is part (d)'s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TEACHER = {"data.image_size": 16, "teacher.width": 16, "teacher.epochs": 5}
SMOKE_TEACHER = {"data.image_size": 16, "teacher.width": 8, "teacher.epochs": 2, "data.max_train_samples": 200}
IG = {"explain.explainer": "integrated_gradients", "explain.ig_steps": 32}
SMOKE_IG = {"explain.explainer": "integrated_gradients", "explain.ig_steps": 4}
SCALED = {"data.image_size": 92, "teacher.width": 8, "teacher.epochs": 2}
SMOKE_SCALED = {"data.image_size": 16, "teacher.width": 8, "teacher.epochs": 1, "data.max_train_samples": 200}


def _config(cache: Path, overrides: dict):
    from xkd_ray.config.schema import ExperimentConfig

    return ExperimentConfig().with_overrides({**overrides, "explain.cache_dir": str(cache)})


def _mb(kilobytes: float) -> float:
    return kilobytes / 1024  # Linux reports ru_maxrss in KiB


def _rss_now_kb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    return float("nan")


def _private_kb() -> float:
    """This process's private memory (USS): pages no other process maps, unlike RSS, which also
    counts the object store's shared pages a process reads."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(float(fields[name].split()[0]) for name in ("Private_Clean", "Private_Dirty"))


def _load() -> None:
    print(f"    load average (1 min) at the end of this part: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def part_teacher(root: Path, overrides: dict):
    """(a): the plain loop vs Ray Train on 1 worker, same config, fresh caches."""
    from xkd_ray.cluster.ray_teacher import train_teacher_with_ray
    from xkd_ray.core.teacher import save_teacher, teacher_directory, train_teacher
    from xkd_ray.data.datasets import load_splits

    plain_config = _config(root / "plain", overrides)
    splits = load_splits(plain_config.data)
    started = time.perf_counter()
    model = train_teacher(plain_config, splits, progress=False)
    teacher = save_teacher(plain_config, splits, model, training={"backend": "plain", "workers": 0})
    plain_s = time.perf_counter() - started
    ray_config = _config(root / "ray", overrides)
    started = time.perf_counter()
    train_teacher_with_ray(ray_config, splits, workers=1, progress=False)
    ray_s = time.perf_counter() - started
    history = json.loads((teacher_directory(ray_config, splits) / "config.json").read_text())["training"]["history"]
    epochs = len(history)
    per_epoch_ray = (history[-1]["wall_time"] - history[0]["wall_time"]) / max(1, epochs - 1)
    fixed_ray = ray_s - epochs * per_epoch_ray
    print(f"(a) teacher, {epochs} epochs: plain loop {plain_s:.1f} s ({plain_s / epochs:.2f} s/epoch incl. save)")
    print(f"    Ray Train, 1 worker: {ray_s:.1f} s = ~{fixed_ray:.1f} s fixed + {per_epoch_ray:.2f} s/epoch")
    _load()
    print(
        f"RESULT teacher_plain_s={plain_s:.2f} teacher_ray1_s={ray_s:.2f} overhead_ratio={ray_s / plain_s:.3f} "
        f"ray_fixed_s={fixed_ray:.2f} ray_per_epoch_s={per_epoch_ray:.3f}",
        flush=True,
    )
    return teacher, splits


def part_explain(root: Path, teacher, splits, overrides: dict, teacher_overrides: dict) -> None:
    """(b): IG in this process, then as the Ray actor job on 1 and 2 workers."""
    from xkd_ray.cluster.ray_explain import explain_on_workers
    from xkd_ray.core.explain import cached_teacher_outputs
    from xkd_ray.data.splits import SPLIT_NAMES

    config = _config(root / "ig", {**teacher_overrides, **overrides})
    explain = config.explain
    started = time.perf_counter()
    for name in SPLIT_NAMES:
        cached_teacher_outputs(
            teacher.model,
            teacher.teacher_id,
            splits.split(name).images,
            name,
            splits.fingerprint(),
            explainer=explain.explainer,
            layer=explain.layer,
            ig_steps=explain.ig_steps,
            blur_sigma=explain.blur_sigma,
            batch_size=explain.batch_size,
            cache_dir=explain.cache_dir,
            progress=False,
        )
    single_s = time.perf_counter() - started
    seconds = {}
    for workers in (1, 2):
        started = time.perf_counter()
        explain_on_workers(teacher, splits, list(SPLIT_NAMES), config, workers=workers, progress=False)
        seconds[workers] = time.perf_counter() - started
    images = sum(len(splits.split(name)) for name in SPLIT_NAMES)
    speedup = seconds[1] / seconds[2]
    print(f"(b) IG ({explain.ig_steps} steps) on {images} images: in-process {single_s:.1f} s, ", end="")
    print(f"1 Ray worker {seconds[1]:.1f} s, 2 Ray workers {seconds[2]:.1f} s")
    _load()
    print(
        f"RESULT ig_in_process_s={single_s:.2f} ig_1_worker_s={seconds[1]:.2f} ig_2_workers_s={seconds[2]:.2f} "
        f"speedup_2_vs_1={speedup:.3f} scaling_efficiency={speedup / 2:.3f}",
        flush=True,
    )


def memory_child(mode: str, cache: str, address: str, overrides: dict) -> None:
    """One fresh driver process: import, run one path, print its peak RSS as JSON."""
    import ray

    from xkd_ray.cluster.ray_explain import prepare_on_workers
    from xkd_ray.core.prepared import prepare

    config = _config(Path(cache), overrides)
    imported_kb = _rss_now_kb()
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    started = time.perf_counter()
    if mode == "plain":
        data = prepare(config, progress=False)
    else:
        data = prepare_on_workers(config, workers=2, use_gpu=False, progress=False)
    wall = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maps_mb = sum(outputs.maps.numel() * 4 for outputs in data.teacher_outputs.values()) / 2**20
    print(json.dumps({"peak_mb": _mb(peak_kb), "imported_mb": _mb(imported_kb), "wall_s": wall, "maps_mb": maps_mb}))


def _legacy_bundle(data):
    """The same tensors as a plain structure, which pickles them as torch tensors: how the
    ``DistillData`` bundle was serialised before ``ZeroCopyPickle`` (a private copy per read)."""
    splits = {
        name: (data.splits.split(name).images, data.splits.split(name).labels) for name in ("train", "val", "test")
    }
    outputs = {name: (o.logits, o.maps, o.deletion_auc, o.insertion_auc) for name, o in data.teacher_outputs.items()}
    return {"splits": splits, "outputs": outputs, "state": data.teacher_state, "template": data.template_map}


def transfer_child(mode: str, cache: str, address: str, overrides: dict) -> None:
    """(d), one fresh driver: prepare, put the bundle (``mode``: before / after), read it from 2
    trial-like tasks, print the driver's peak RSS and each reader's added private memory as JSON."""
    import ray

    from xkd_ray.cluster.ray_explain import prepare_on_workers

    config = _config(Path(cache), overrides)
    imported_kb = _rss_now_kb()
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    data = prepare_on_workers(config, workers=2, use_gpu=False, progress=False)
    bundle_mb = sum(
        t.numel() * t.element_size()
        for t in [*(s.images for s in (data.splits.train, data.splits.val, data.splits.test)),
                  *(o.maps for o in data.teacher_outputs.values())]
    ) / 2**20  # fmt: skip
    if mode == "before":
        ref = ray.put(_legacy_bundle(data))
    else:
        ref = ray.put(data)
        del data  # as run_search does: the driver keeps the reference only

    @ray.remote(num_cpus=0)
    def read(box: list) -> float:
        import xkd_ray.core.prepared  # noqa: F401  (what unpickling imports, so only the data is counted)

        before = _private_kb()
        value = ray.get(box[0])
        added = _private_kb() - before
        del value
        return added / 1024

    readers = [read.remote([ref]) for _ in range(2)]
    added = ray.get(readers)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"peak_mb": _mb(peak_kb), "imported_mb": _mb(imported_kb), "reader_mb": added, "bundle_mb": bundle_mb}
        )
    )


def _child(flag: str, mode: str, cache: Path, address: str, overrides: dict) -> dict:
    """Run this script as a fresh driver process in ``mode``; its last stdout line, as JSON."""
    command = [sys.executable, __file__, flag, mode, "--cache", str(cache), "--address", address]
    child = subprocess.run([*command, "--overrides", json.dumps(overrides)], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"{flag} {mode} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def part_transfer(root: Path, address: str, overrides: dict) -> None:
    """(d): data to trials before / after, in fresh drivers sharing one warm cache."""
    cache = root / "transfer"
    measured = {}
    for mode in ("warm-up", "before", "after"):
        measured[mode] = _child("--transfer-child", "after" if mode == "warm-up" else mode, cache, address, overrides)
    before, after = measured["before"], measured["after"]
    print(
        f"(d) data to trials, {overrides}: bundle {after['bundle_mb']:.0f} MB (images + maps); driver peak RSS "
        f"before {before['peak_mb']:.0f} MB, after {after['peak_mb']:.0f} MB (imports {after['imported_mb']:.0f} MB); "
        f"private memory a trial's read adds: before {before['reader_mb']}, after {after['reader_mb']} MB"
    )
    reader_before = max(before["reader_mb"])
    reader_after = max(after["reader_mb"])
    _load()
    print(
        f"RESULT driver_peak_before_mb={before['peak_mb']:.1f} driver_peak_after_mb={after['peak_mb']:.1f} "
        f"driver_peak_ratio={after['peak_mb'] / before['peak_mb']:.3f} bundle_mb={after['bundle_mb']:.1f} "
        f"trial_copy_before_mb={reader_before:.1f} trial_copy_after_mb={reader_after:.1f}",
        flush=True,
    )


def part_memory(root: Path, address: str, overrides: dict) -> None:
    """(c): ``prepare`` vs ``prepare_on_workers``, each in a fresh driver, fresh caches."""
    measured = {}
    for mode in ("plain", "workers"):
        measured[mode] = _child("--memory-child", mode, root / f"mem-{mode}", address, overrides)
    plain, workers = measured["plain"], measured["workers"]
    print(
        f"(c) driver peak RSS, {overrides}: prepare {plain['peak_mb']:.0f} MB ({plain['wall_s']:.1f} s), "
        f"prepare_on_workers {workers['peak_mb']:.0f} MB ({workers['wall_s']:.1f} s); "
        f"after imports {plain['imported_mb']:.0f} / {workers['imported_mb']:.0f} MB; maps {plain['maps_mb']:.1f} MB"
    )
    above_plain = plain["peak_mb"] - plain["imported_mb"]
    above_workers = workers["peak_mb"] - workers["imported_mb"]
    _load()
    print(
        f"RESULT prepare_peak_mb={plain['peak_mb']:.1f} on_workers_peak_mb={workers['peak_mb']:.1f} "
        f"peak_ratio={workers['peak_mb'] / plain['peak_mb']:.3f} prepare_above_imports_mb={above_plain:.1f} "
        f"on_workers_above_imports_mb={above_workers:.1f} prepare_s={plain['wall_s']:.2f} "
        f"on_workers_s={workers['wall_s']:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs, each part once")
    parser.add_argument("--memory-child", choices=("plain", "workers"), help=argparse.SUPPRESS)
    parser.add_argument("--transfer-child", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.cache, args.address, json.loads(args.overrides))
        return
    if args.transfer_child:
        transfer_child(args.transfer_child, args.cache, args.address, json.loads(args.overrides))
        return
    import ray

    teacher_overrides = SMOKE_TEACHER if args.smoke else TEACHER
    ig, scaled = (SMOKE_IG, SMOKE_SCALED) if args.smoke else (IG, SCALED)
    print(f"config: (a) {teacher_overrides}; (b) {ig}; (c) {scaled}")
    print(f"machine: {os.cpu_count()} CPUs; local Ray with {os.cpu_count()} CPUs, started before timing", flush=True)
    ray.init(address="local", num_cpus=os.cpu_count(), logging_level="ERROR", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    try:
        with tempfile.TemporaryDirectory(prefix="xkd-cluster-pipeline-") as directory:
            root = Path(directory)
            teacher, splits = part_teacher(root, teacher_overrides)
            part_explain(root, teacher, splits, ig, teacher_overrides)
            part_memory(root, address, scaled)
            part_transfer(root, address, scaled)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
