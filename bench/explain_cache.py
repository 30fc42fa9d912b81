"""What does the teacher-explanation cache save per search trial?

A trial's work is: get the teacher's logits and maps for every split, then train and evaluate
one `xd` student. With the cache the first step is a Parquet read; without it the trial runs
the teacher's explainer over the whole dataset itself. Both variants use the same trained
teacher (loaded from its checkpoint), so only the explanation step differs.
Prints per-trial seconds and the speed-up for every registered explainer (``EXPLAINERS``), or
those named with --explainers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.distill import distill
from xkd_ray.core.explain import EXPLAINERS
from xkd_ray.core.prepared import prepare
from xkd_ray.core.teacher import teacher_id


def trial_seconds(config: ExperimentConfig) -> tuple[float, float]:
    """(seconds to get the teacher outputs, seconds for the whole trial)."""
    started = time.perf_counter()
    data = prepare(config, progress=False)
    explained = time.perf_counter()
    distill(config, data, progress=False)
    return explained - started, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--epochs", type=int, default=12, help="student epochs per trial (default search: 12)")
    registered = ", ".join(EXPLAINERS)
    parser.add_argument("--explainers", default=",".join(EXPLAINERS), help=f"comma-separated, from: {registered}")
    args = parser.parse_args()
    explainers = [name.strip() for name in args.explainers.split(",") if name.strip()]
    unknown = [name for name in explainers if name not in EXPLAINERS]
    if unknown or not explainers:
        parser.error(f"--explainers: unknown {', '.join(unknown) or '(none given)'}; registered: {registered}")
    overrides: dict = {"distill.epochs": args.epochs}
    if args.smoke:
        overrides = {"data.image_size": 16, "teacher.width": 8, "teacher.epochs": 1, "student.width": 8}
        overrides |= {"distill.epochs": 1, "explain.cache_dir": ".xkd_cache/smoke", "explain.ig_steps": 4}
    base = ExperimentConfig().with_overrides(overrides)
    warm = prepare(base, progress=False)  # trains the teacher once if needed
    checkpoint = Path(base.explain.cache_dir) / "teachers" / f"teacher-{teacher_id(base, warm.splits)}" / "model.pt"
    speedups = {}
    for explainer in explainers:
        config = base.with_overrides({"explain.explainer": explainer, "teacher.checkpoint": str(checkpoint)})
        prepare(config, progress=False)  # fill the cache for this explainer
        cached_explain, cached_total = trial_seconds(config)
        with tempfile.TemporaryDirectory() as empty_cache:
            fresh = config.with_overrides({"explain.cache_dir": empty_cache})
            fresh_explain, fresh_total = trial_seconds(fresh)
        speedups[explainer] = fresh_total / cached_total
        print(
            f"{explainer:22s} trial with cache {cached_total:7.1f} s (teacher outputs {cached_explain:5.2f} s) | "
            f"recomputing {fresh_total:7.1f} s (teacher outputs {fresh_explain:6.1f} s) | "
            f"speed-up {speedups[explainer]:.2f}x"
        )
    print("RESULT " + " ".join(f"cache_speedup_{name}={speedup:.2f}" for name, speedup in speedups.items()))


if __name__ == "__main__":
    main()
