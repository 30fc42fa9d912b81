"""``xkd demo``: the product in one command on the embedded digits (teacher, KD vs XD, the default
search, the knee student loaded from disk and compared with what ``xkd distill`` trains)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from xkd_ray.pareto.display import metrics_table
from xkd_ray.ui.cli import check_cache_folder, check_output_folder, config_from_args, console, run_distill


def run_demo(args: argparse.Namespace) -> int:
    """The product in one command, on the embedded digits: teacher, a KD and an XD student side
    by side, then the default search, ending with the knee student loaded from disk."""
    config = config_from_args(args)
    out = Path(args.out)
    check_output_folder("--out", out)
    check_cache_folder(config)
    runs = {}
    started = time.perf_counter()
    for method in ("kd", "xd"):
        method_config = config.with_overrides({"distill.method": method})
        runs[method] = run_distill(method_config, out / method)
    console.print(
        metrics_table(f"digits: KD vs XDistillation, test split ({time.perf_counter() - started:.0f} s)", runs)
    )
    teacher = runs["xd"]["teacher"]
    console.print(
        f"teacher test accuracy {teacher['test_accuracy']:.3f}; fidelity_template is the score of one constant "
        "map (the mean teacher map): a method transfers explanations only where it beats it."
    )
    if args.no_search:
        return 0
    from xkd_ray.pareto.experiment_folder import MANIFEST
    from xkd_ray.pareto.front import load_pareto_student
    from xkd_ray.search import main as search_main

    experiment = out / "search"
    search_args = ["--space", str(args.space), "--out", str(experiment), "--trials", str(args.trials)]
    resume = args.resume or (experiment / MANIFEST).exists()
    if resume and not args.resume:
        console.print(f"{experiment} holds this demo's earlier search: continuing it (--resume)")
    code = search_main([*search_args, *(["--resume"] if resume else [])])
    if code != 0:
        return code
    knee = load_pareto_student(experiment, prefer="knee")
    console.print(metrics_table(f"knee student from {knee.path} (loaded from disk)", {"knee": knee.metrics}))
    _print_knee_vs_reference(experiment, knee.path.name)
    console.print(f"total {time.perf_counter() - started:.0f} s; front plot: {experiment / 'pareto' / 'front.png'}")
    return 0


def _print_knee_vs_reference(experiment: Path, knee_trial: str) -> None:
    """The knee student and the reference (exactly what `xkd distill --method M` trains with its
    CLI defaults) on the search's objectives, validation and test split: the search is worth
    running when the reference does not dominate the knee."""
    from xkd_ray.core.checkpoints import read_json_mapping
    from xkd_ray.core.metrics import dominates
    from xkd_ray.pareto.front import read_objectives, read_trials, summary

    reference = (summary(experiment) or {}).get("reference_config")
    rows = {row["trial_id"]: row for row in read_trials(experiment)}
    if reference is None or knee_trial not in rows or reference["trial_id"] not in rows:
        return
    objectives = read_objectives(experiment)

    def values(trial_id: str, split: str) -> tuple[float, ...] | None:
        folder = rows[trial_id].get("student_dir")
        metrics = read_json_mapping(Path(folder) / "metrics.json").get(split, {}) if folder else {}
        found = tuple(metrics.get(name) for name in objectives.names)
        return None if None in found else tuple(float(v) for v in found)

    def shown(point: tuple[float, ...] | None) -> str:
        return "-" if point is None else ", ".join(f"{value:.3f}" for value in point)

    for split in ("val", "test"):
        knee, ref = values(knee_trial, split), values(reference["trial_id"], split)
        verdict = ""
        if knee is not None and ref is not None:
            dominated = dominates(ref, knee, objectives.directions)
            verdict = f": the knee is {'dominated' if dominated else 'not dominated'} by the reference"
        console.print(
            f"{split} ({', '.join(objectives.names)}): knee {shown(knee)}, reference "
            f"(`xkd distill --method {rows[reference['trial_id']]['method']}` defaults) {shown(ref)}{verdict}"
        )
