"""Do TPE and NSGA-II find better fronts than random search for the same budget?

Runs the same search space with each sampler and several seeds (same budget, same data and
teacher), and compares the median validation hypervolume (reference (0, 0)) as ratios to
random search. Run: python bench/search_quality.py [--space search_spaces/default.yaml]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

from xkd_ray.cluster.ray_search import run_search
from xkd_ray.config.space import SAMPLERS, load_search_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=Path("search_spaces/default.yaml"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="student epochs per trial")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    samplers = SAMPLERS
    if args.smoke:
        args.space, args.trials, args.seeds, samplers = Path("search_spaces/smoke.yaml"), 2, 1, ("tpe", "random")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=True, logging_level="ERROR", log_to_driver=False)
    volumes: dict[str, list[float]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xkd-search-quality-") as root:
        for sampler in samplers:
            for seed in range(args.seeds):
                search = {"trials": args.trials, "sampler": sampler, "seed": seed}
                epochs = None if args.smoke else {"distill.epochs": args.epochs}
                spec = load_search_space(args.space, search, base_overrides=epochs)
                summary = run_search(spec, Path(root) / f"{sampler}-{seed}", live=False)
                volumes.setdefault(sampler, []).append(summary["hypervolume"])
                print(f"{sampler:6s} seed {seed}: hypervolume {summary['hypervolume']:.4f}", flush=True)
    ray.shutdown()
    medians = {sampler: statistics.median(values) for sampler, values in volumes.items()}
    for sampler, median in medians.items():
        print(f"{sampler:6s} median hypervolume {median:.4f} over {len(volumes[sampler])} seeds")
    print(f"{args.trials} trials per search, {time.perf_counter() - started:.0f} s in all")
    ratios = " ".join(f"{s}_vs_random={medians[s] / medians['random']:.3f}" for s in medians if s != "random")
    print(f"RESULT {ratios} random_hypervolume={medians['random']:.4f}")


if __name__ == "__main__":
    main()
