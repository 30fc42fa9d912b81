"""Where does a search trial's fixed cost go, before its first epoch trains and after its last?

Runs N sequential trials of the default digits config (search_spaces/default.yaml's base, one
worker per trial, nothing sampled) through the search's own trainable (``ray_trial.build_trainable``:
the Tune driver function, its Ray Train run, ``TuneReportCallback``), one at a time. Every phase
is a wall-clock stamp taken where it happens, all on this machine's clock:
  * the trial driver's final report (``timings``): process started, driver entered, fit called
    and returned, final report;
  * the workers' first report (``ray_train.worker_loop``'s ``timings``): worker process started,
    torch / xkd_ray imports done, loop entered, prepared data fetched, first epoch started,
    trained, evaluated, reported;
  * this process (Tune's driver): trial started, first result received, trial completed.
Two arms, the same trials, one after the other on one Ray: ``ray_train`` (every trial a Ray Train
run: trial driver, Train controller, worker process; ``search.one_worker_in_driver: false``) and
``in_driver`` (the default for one-worker trials: the trial driver trains itself, and Tune reuses
its process for the next trial, as ``xkd search`` does). Prints each phase's median over the
trials per arm ("-" where a phase does not exist in that arm), the import cost of a worker
measured alone in a fresh interpreter, and a RESULT line, per arm: ``fixed_cost_s`` (driver
entered -> first epoch starts), ``trial_wall_s`` (the trial's driver process started, or for a
reused process the previous trial ended -> Tune sees it complete), ``overhead_s`` (the wall time
that is not epochs: start-up plus tail) and its share ``overhead_fraction``; unsuffixed keys are
the in_driver arm, ``_ray_train`` the other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from xkd_ray.config.space import SearchSpec, load_search_space

SPACE = Path("search_spaces/default.yaml")
SMOKE = {
    "data": {"dataset": "digits", "image_size": 16},
    "teacher": {"arch": "vgg", "width": 8, "epochs": 1},
    "student": {"width": 8, "ae_width": 8},
    "distill": {"method": "xd", "epochs": 2, "batch_size": 64},
    "explain": {"explainer": "gradcam", "cache_dir": ".xkd_cache/smoke"},
}
# (label, from stamp, to stamp), in the order a trial meets them.
PHASES = (
    ("trial starts -> driver entered (process, imports)", "trial_started", "driver_entered"),
    ("driver entered -> TorchTrainer.fit called", "driver_entered", "fit_called"),
    ("fit -> worker process started (controller, PG)", "fit_called", "worker_process_started"),
    ("worker start -> imports done (+ process group)", "worker_process_started", "worker_imports_done"),
    ("imports done -> worker_loop entered", "worker_imports_done", "worker_loop_entered"),
    ("worker_loop -> prepared data fetched", "worker_loop_entered", "data_ready"),
    ("data -> first epoch starts (model, loader)", "data_ready", "first_epoch_started"),
    ("first epoch: training", "first_epoch_started", "first_epoch_trained"),
    ("first epoch: validation (first evaluation)", "first_epoch_trained", "first_evaluated"),
    ("first epoch: checkpoint written", "first_evaluated", "first_report"),
    ("first report -> received by Tune", "first_report", "tune_first_result"),
    ("remaining epochs", "first_report", "last_epoch_report"),
    ("last epoch report -> fit returns", "last_epoch_report", "fit_returned"),
    ("fit returned -> student saved, reported", "fit_returned", "driver_reported"),
    ("driver reported -> Tune: trial complete", "driver_reported", "tune_complete"),
)


def bench_spec(smoke: bool, trials: int, epochs: int | None = None, in_driver: bool = True) -> SearchSpec:
    """The default space's base (or a tiny one), nothing sampled, one worker, one trial at a time."""
    raw = yaml.safe_load(SPACE.read_text())
    if smoke:
        raw["base"] = SMOKE
    if epochs is not None:
        raw["base"]["distill"]["epochs"] = epochs
    raw["space"] = {"distill.method": raw["base"]["distill"].get("method", "xd")}  # fixed: every trial alike
    raw["search"] = {
        "trials": trials,
        "sampler": "random",
        "seed": 0,
        "workers_per_trial": 1,
        "cpus_per_worker": raw.get("search", {}).get("cpus_per_worker", 0.9),
        "max_concurrent_trials": 1,
        "one_worker_in_driver": in_driver,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(raw, handle)
    try:
        return load_search_space(handle.name)
    finally:
        os.unlink(handle.name)


def import_seconds() -> float:
    """What a fresh worker pays to import the training code (``xkd_ray.cluster.ray_train``) alone."""
    code = "import time; t = time.perf_counter(); import xkd_ray.cluster.ray_train; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def run_trials(spec: SearchSpec, trials: int, storage: Path, reuse_actors: bool = False) -> list[dict[str, float]]:
    """``trials`` sequential trials through the search's trainable; one dict of stamps per trial."""
    import ray
    from ray import tune

    from xkd_ray.cluster.ray_trial import build_trainable
    from xkd_ray.core.prepared import prepare

    stamps: dict[str, dict[str, float]] = {}

    class Stamps(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            stamps.setdefault(trial.trial_id, {})["tune_start"] = time.time()

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            mine = stamps.setdefault(trial.trial_id, {})
            mine.setdefault("tune_first_result", time.time())
            if "timings" in result and "first_report" in result["timings"]:
                for key, value in result["timings"].items():
                    mine.setdefault(key, float(value))  # the first attempt's (a restarted worker reports again)
            if "epoch" in result:
                mine["last_epoch_report"] = float(result["wall_time"])

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            mine = stamps.setdefault(trial.trial_id, {})
            mine["tune_complete"] = time.time()
            timings = (trial.last_result or {}).get("timings", {})
            mine.update((key, value) for key, value in timings.items() if isinstance(value, float))

    data = prepare(spec.trial_config({}), progress=False)
    shared = {"experiment": str(storage), "spec": spec, "data_ref": ray.put(data)}
    tuner = tune.Tuner(
        build_trainable(shared),
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1, reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name="tune", storage_path=str(storage), callbacks=[Stamps()], verbose=0),
    )
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} trial(s) failed: {results.errors[0]}")
    runs = sorted(stamps.values(), key=lambda run: run["tune_start"])
    previous_end = 0.0
    for run in runs:  # a reused driver process (--reuse-actors) starts its next trial when the last one ends
        run["trial_started"] = max(run["driver_process_started"], previous_end)
        previous_end = run["tune_complete"]
        for stamp in ("worker_process_started", "worker_imports_done"):  # an earlier trial's, in a reused process
            if run.get(stamp, run["trial_started"]) < run["trial_started"]:
                del run[stamp]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one short trial of a tiny config")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="distill.epochs (default: the config's)")
    parser.add_argument("--json", type=Path, help="also write every trial's raw stamps here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    trials = 1 if args.smoke else args.trials
    imports = import_seconds()

    import ray

    # Ray Train's PlacementGroupCleaner asks the state API whether the run's controller is alive;
    # with no address it auto-detects a Ray instance and, when several run on one machine (other
    # benches, test sessions), may ask the newest one, which does not know our controller: it then
    # removes our placement group and kills the trial's worker. Point it at no API server (as
    # with no dashboard: the check fails and is retried) instead of someone else's. Set before
    # ray.init, so every Ray process of this instance inherits it.
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    started = time.perf_counter()
    ray.init(
        address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False
    )
    ray_start = time.perf_counter() - started
    arms: dict[str, list[dict[str, float]]] = {}
    try:
        for arm in ("ray_train", "in_driver"):
            in_driver = arm == "in_driver"
            storage = Path(tempfile.mkdtemp(prefix="xkd-trial-overhead-"))
            try:  # reuse_actors as the search sets it (ray_search.run_search)
                spec = bench_spec(args.smoke, trials, args.epochs, in_driver=in_driver)
                arms[arm] = run_trials(spec, trials, storage, reuse_actors=in_driver)
            finally:
                shutil.rmtree(storage, ignore_errors=True)
    finally:
        ray.shutdown()

    if args.json:
        args.json.write_text(json.dumps(arms, indent=1))

    def median(runs: list[dict[str, float]], start: str, end: str) -> float:
        values = [run[end] - run[start] for run in runs if start in run and end in run]
        return statistics.median(values) if values and min(values) >= 0 else float("nan")

    def shown(value: float) -> str:
        return f"{value:10.2f}" if math.isfinite(value) else f"{'-':>10s}"

    config = spec.trial_config({})
    print(
        f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {trials} trial(s) per arm of "
        f"{config.distill.method} on {config.data.dataset} {config.data.image_size}px, "
        f"{config.distill.epochs} epochs, {config.ray.num_workers} worker; Ray start {ray_start:.1f} s"
    )
    print(f"{'phase (median over trials, seconds)':52s} {'ray_train':>10s} {'in_driver':>10s}")
    for label, start, end in PHASES:
        print(
            f"{label:52s} {shown(median(arms['ray_train'], start, end))} {shown(median(arms['in_driver'], start, end))}"
        )
    print(f"{'  of which: import xkd_ray.cluster.ray_train, fresh process':52s} {imports:10.2f}")
    result = {}
    for arm, runs in arms.items():
        fixed = median(runs, "driver_entered", "first_epoch_started")
        wall = median(runs, "trial_started", "tune_complete")
        overhead = statistics.median(
            run["tune_complete"] - run["trial_started"] - (run["last_epoch_report"] - run["first_epoch_started"])
            for run in runs
        )
        suffix = "" if arm == "in_driver" else "_ray_train"
        result.update({f"fixed_cost_s{suffix}": fixed, f"trial_wall_s{suffix}": wall, f"overhead_s{suffix}": overhead})
        result[f"overhead_fraction{suffix}"] = overhead / wall
    for label, key in (
        ("fixed cost: driver entered -> first epoch starts", "fixed_cost_s"),
        ("trial wall: trial starts -> Tune: complete", "trial_wall_s"),
        ("overhead: trial wall - epochs", "overhead_s"),
    ):
        print(f"{label:52s} {shown(result[key + '_ray_train'])} {shown(result[key])}")
    print("RESULT " + " ".join(f"{key}={value:.3f}" for key, value in result.items()))


if __name__ == "__main__":
    main()
