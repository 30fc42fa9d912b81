"""Is `xkd search` worth its compute? The same wall-clock budget for three ways to search.

(a) plain Optuna in one process, without Ray: the same training function (the plain loop,
    ``xkd_ray.core.distill.distill``), the same sampler and settings, the same objectives and
    reference point, one trial after another; what a user would write instead;
(b) ``xkd search`` with the FIFO scheduler (every trial trains all its epochs);
(c) ``xkd search`` with MO-ASHA (the space's ``search.scheduler``, else grace 2, eta 3);
(d) plain Optuna as (a) with Optuna's ``GPSampler`` (multi-objective since Optuna 4.4).

Every arm starts from the same points: the reference and each ``search.cli_defaults`` method,
trained exactly as ``xkd distill`` would (``SearchSpec.config_for``).

``--long``: a budget where successive halving can pay (the MO-ASHA paper evaluates with tens to
hundreds of trials): 20-epoch trials, rungs at 2, 6 and 18 epochs (max epochs 10x the first
rung, 3 rungs), 20 minutes per arm; it prints whether every arm finished >= 27 trials.

Each arm runs ``--seeds`` times for ``--budget-minutes`` of wall time (the teacher and its
explanations are prepared once before, so no arm pays for them). Every finished trial's time is
recorded; the hypervolume of the val front over time gives the curves (a PNG) and:

    hv_vs_reference          median over seeds of HV(c) / HV of the reference config alone
    mo_asha_time_to_fifo_hv  median fraction of the budget (c) needs to reach (b)'s final HV
                             (a seed that never reaches it counts as 1.0; how many did is printed
                             as mo_asha_reached_fifo_hv_seeds)
    xkd_vs_plain_optuna      median over seeds of HV(b) / HV(a) at the budget
    gp_vs_tpe_hv             median over seeds of HV(d) / HV(a) at the budget

``--record FILE`` keeps each finished seed (one JSON line: curves, final hypervolumes, trial
counts) and the RESULT covers every seed in the file, so the long comparison (80 minutes per seed
on 2 cores) can be run a seed at a time: ``--long --first-seed 1 --seeds 1 --record FILE``.

Run: python bench/search_efficiency.py [--space search_spaces/default.yaml] [--budget-minutes 6]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from xkd_ray.cluster.ray_search import make_sampler
from xkd_ray.config.space import Parameter, SearchSpec, load_search_space
from xkd_ray.core.distill import distill
from xkd_ray.core.metrics import hypervolume
from xkd_ray.core.prepared import prepare
from xkd_ray.pareto.front import Objectives, read_trials

Curve = list[tuple[float, tuple[float, ...]]]  # (seconds since start, val objective point)
ARMS = ("plain_optuna", "xkd_fifo", "xkd_mo_asha", "plain_optuna_gp")


def _distribution(parameter: Parameter) -> optuna.distributions.BaseDistribution:
    if parameter.kind == "choice":
        return optuna.distributions.CategoricalDistribution(list(parameter.choices))
    if parameter.kind == "int":
        return optuna.distributions.IntDistribution(int(parameter.low), int(parameter.high))
    return optuna.distributions.FloatDistribution(parameter.low, parameter.high, log=parameter.kind == "loguniform")


def plain_optuna(spec: SearchSpec, budget_s: float, gp: bool = False) -> tuple[Curve, tuple[float, ...] | None]:
    """Arms (a) and (d): ask/tell in this process; the CLI-default points first, as in xkd."""
    objectives = Objectives.of(spec.search)
    sampler = (
        optuna.samplers.GPSampler(seed=spec.search.seed)
        if gp
        else make_sampler(spec.search.sampler, spec.search.seed, spec.search.trials)
    )
    study = optuna.create_study(directions=[f"{d}imize" for d in objectives.directions], sampler=sampler)
    for point in spec.cli_points():
        study.enqueue_trial(point)
    distributions = {name: _distribution(p) for name, p in spec.parameters.items() if p.kind != "fixed"}
    data = prepare(spec.trial_config({}), progress=False)
    curve: Curve = []
    reference = None
    started = time.perf_counter()
    while time.perf_counter() - started < budget_s:
        trial = study.ask(distributions)
        config = spec.config_for(trial.params).with_overrides({"ray.num_workers": 0})
        _, metrics = distill(config, data, progress=False)
        values = tuple(metrics["val"][name] for name in objectives.names)
        if not all(math.isfinite(v) for v in values):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        study.tell(trial, list(values))
        elapsed = time.perf_counter() - started
        if elapsed <= budget_s and objectives.feasible({f"val_{k}": v for k, v in metrics["val"].items()}):
            curve.append((elapsed, values))
        if spec.is_reference(trial.params):
            reference = values
    return curve, reference


def xkd_search(spec: SearchSpec, folder: Path, budget_s: float) -> tuple[Curve, tuple[float, ...] | None]:
    """Arms (b) and (c): the real search, ended by Tune's time budget, each on a fresh local Ray:
    trials cut off by the budget (and MO-ASHA's stops) leave Ray Train placement groups that Ray
    frees only later, and in one shared session they starved the next arms of CPUs."""
    import ray

    from xkd_ray.cluster.ray_search import run_search

    objectives = Objectives.of(spec.search)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=True, logging_level="ERROR", log_to_driver=False)
    started = time.time()
    try:
        run_search(spec, folder, live=False, time_budget_s=budget_s)
    finally:
        ray.shutdown()
    rows = read_trials(folder)
    curve = [
        (row["finished_at"] - started, objectives.point(row))
        for row in rows
        if row["status"] == "ok" and row["finished_at"] - started <= budget_s and objectives.feasible(row)
    ]
    reference = next((objectives.point(r) for r in rows if r.get("reference") and r["status"] == "ok"), None)
    return sorted(curve), reference


def hv_at(curve: Curve, t: float, objectives: Objectives) -> float:
    return hypervolume([p for when, p in curve if when <= t], objectives.reference_point, objectives.directions)


def time_to_reach(curve: Curve, target: float, objectives: Objectives) -> float | None:
    for when, _ in sorted(curve):
        if hv_at(curve, when, objectives) >= target:
            return when
    return None


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def plot(curves: dict[str, list[Curve]], objectives: Objectives, budget_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (arm, runs), color in zip(curves.items(), ("tab:grey", "tab:blue", "tab:orange", "tab:green"), strict=False):
        for index, curve in enumerate(runs):
            times = [0.0, *sorted(when for when, _ in curve), budget_s]
            volumes = [hv_at(curve, t, objectives) for t in times]
            axes.step([t / 60 for t in times], volumes, where="post", color=color, alpha=0.8,
                      label=arm if index == 0 else None)  # fmt: skip
    axes.set_xlabel("wall time (minutes)")
    axes.set_ylabel(f"val hypervolume ({' x '.join(objectives.names)})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_seed(base: SearchSpec, args: argparse.Namespace, seed: int, root: Path, budget_s: float) -> dict[str, Any]:
    """The four arms for one seed: each arm's curve, its final hypervolume and trial count, the
    reference config's point, and how long MO-ASHA took to reach FIFO's final hypervolume."""
    trials = {"trials": 1000, "seed": seed}  # the budget, not the trial count, ends each arm
    asha = base.search.scheduler.model_dump() if base.search.scheduler.name != "fifo" else None
    if args.long:
        asha = {"name": "mo_asha", "grace_epochs": 2, "reduction_factor": 3}
    fifo = load_search_space(args.space, {**trials, "scheduler": {"name": "fifo"}})
    mo_asha = load_search_space(args.space, {**trials, "scheduler": asha or {"name": "mo_asha"}})
    objectives = Objectives.of(fifo.search)
    record: dict[str, Any] = {"seed": seed, "budget_s": budget_s, "curves": {}, "final": {}, "finished": {}}
    for arm in ARMS:
        if arm.startswith("plain_optuna"):
            curve, reference = plain_optuna(fifo, budget_s, gp=arm == "plain_optuna_gp")
        else:
            spec = fifo if arm == "xkd_fifo" else mo_asha
            curve, reference = xkd_search(spec, root / f"{arm}-{seed}", budget_s)
        record["curves"][arm], record["finished"][arm] = curve, len(curve)
        record["final"][arm] = hv_at(curve, budget_s, objectives)
        if arm == "xkd_mo_asha":
            record["reference_hv"] = (
                hypervolume([reference], objectives.reference_point, objectives.directions) if reference else None
            )
        final = record["final"][arm]
        print(f"seed {seed} {arm:12s}: {len(curve)} feasible trials, hypervolume {final:.4f}", flush=True)
    fifo_final = record["final"]["xkd_fifo"]
    reached = time_to_reach(record["curves"]["xkd_mo_asha"], fifo_final, objectives) if fifo_final > 0 else 0.0
    record["mo_asha_reached_fifo_hv"] = reached is not None
    record["mo_asha_time_to_fifo_hv"] = 1.0 if reached is None else reached / budget_s
    return record


def read_records(path: Path | None, budget_s: float) -> list[dict[str, Any]]:
    """Seeds recorded by earlier runs (one JSON object per line) at the same budget: a long
    comparison (4 arms x 20 min per seed) can be spread over several sessions."""
    if path is None or not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    other = sorted({r["budget_s"] for r in records} - {budget_s})
    if other:
        raise SystemExit(f"--record {path}: holds seeds at a budget of {other} s, not {budget_s} s")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=Path("search_spaces/default.yaml"))
    parser.add_argument("--budget-minutes", type=float, default=6.0)
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds to run now")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--record",
        type=Path,
        help="JSON-lines file: each seed is appended as it finishes, and the RESULT covers every seed in it",
    )
    parser.add_argument("--plot", type=Path, default=Path(tempfile.gettempdir()) / "xkd_search_efficiency.png")
    parser.add_argument("--smoke", action="store_true", help="smoke space, 1 seed, 40 s per arm")
    parser.add_argument("--long", action="store_true", help="20 min per arm, rungs 2/6/18 of 20 epochs")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.smoke:
        args.space, args.budget_minutes, args.seeds = Path("search_spaces/smoke.yaml"), 40 / 60, 1
    if args.long and args.budget_minutes == parser.get_default("budget_minutes"):
        args.budget_minutes = 20.0
    budget_s = 60 * args.budget_minutes
    records = read_records(args.record, budget_s)
    done = {r["seed"] for r in records}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xkd-search-efficiency-") as root:
        base = load_search_space(args.space)
        prepare(base.trial_config({}), progress=False)  # teacher + explanations, cached for every arm
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if seed in done:
                print(f"seed {seed}: already in {args.record}, skipped")
                continue
            record = run_seed(base, args, seed, Path(root), budget_s)
            records.append(record)
            if args.record is not None:
                with args.record.open("a") as file:
                    file.write(json.dumps(record) + "\n")
    objectives = Objectives.of(base.search)
    records.sort(key=lambda r: r["seed"])
    # A transcribed record (from a run before records were kept) has no curves: only its numbers count.
    plot({arm: [r["curves"][arm] for r in records if r.get("curves")] for arm in ARMS}, objectives, budget_s, args.plot)
    minutes = [*(2.5 * k for k in range(1, math.ceil(budget_s / 150))), budget_s / 60]  # every 2.5 min
    for record in (r for r in records if r.get("curves")):  # when each arm got its hypervolume
        for arm in ARMS:
            curve = [(when, tuple(point)) for when, point in record["curves"][arm]]
            at = " ".join(f"{m:g}m {hv_at(curve, 60 * m, objectives):.3f}" for m in minutes)
            print(f"seed {record['seed']} {arm:16s} hypervolume at {at}")
    final = {arm: [r["final"][arm] for r in records] for arm in ARMS}
    for arm, volumes in final.items():
        print(f"{arm:12s} hypervolume per seed: {', '.join(f'{v:.4f}' for v in volumes)}")
    reference_hv = [r["reference_hv"] for r in records if r.get("reference_hv")]
    print(f"seeds: {', '.join(str(r['seed']) for r in records)}")
    print(f"reference config hypervolume per seed: {', '.join(f'{v:.4f}' for v in reference_hv) or '-'}")
    print(f"budget {args.budget_minutes:.1f} min per arm and seed; {time.perf_counter() - started:.0f} s in all now")
    print(f"curves: {args.plot}")
    median: Any = statistics.median
    hv_vs_reference = _ratio(median(final["xkd_mo_asha"]), median(reference_hv) if reference_hv else 0.0)
    xkd_vs_plain = median([_ratio(b, a) for a, b in zip(final["plain_optuna"], final["xkd_fifo"], strict=True)])
    gp_vs_tpe = median([_ratio(d, a) for a, d in zip(final["plain_optuna"], final["plain_optuna_gp"], strict=True)])
    fewest = min(min(r["finished"].values()) for r in records)
    reached_seeds = sum(r["mo_asha_reached_fifo_hv"] for r in records)
    print(f"fewest feasible trials finished by an arm: {fewest} (the long budget asks for >= 27)")
    print(
        f"RESULT seeds={len(records)} hv_vs_reference={hv_vs_reference:.3f} "
        f"mo_asha_time_to_fifo_hv={median([r['mo_asha_time_to_fifo_hv'] for r in records]):.3f} "
        f"mo_asha_reached_fifo_hv_seeds={reached_seeds} xkd_vs_plain_optuna={xkd_vs_plain:.3f} "
        f"gp_vs_tpe_hv={gp_vs_tpe:.3f} fewest_trials_per_arm={fewest}"
    )


if __name__ == "__main__":
    main()
