"""Where should MO-ASHA's first rung be? How well a trial's rank at epoch e predicts its final rank.

Trains ``--configs`` students of the space to their last epoch in this process (the plain loop,
the per-epoch validation the search reports: ``evaluate(..., diagnostics=False)``): the
``search.cli_defaults`` points first, then random points of the space. For every epoch e, the
Kendall tau between the ranking at e and the final ranking, per objective. A rung at e stops
trials on their rank at e: a tau well below 1 there stops trials that would have ended well
(e.g. a default-config trial on its early-epoch noise). The grace period is the first epoch
where every objective's tau reaches ``--tau`` (0.6 by default).

Run: python bench/rung_agreement.py [--space search_spaces/default.yaml] [--configs 12]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import optuna
from scipy.stats import kendalltau

from xkd_ray.config.space import Parameter, load_search_space
from xkd_ray.core.distill import distill
from xkd_ray.core.prepared import prepare


def _distribution(parameter: Parameter) -> optuna.distributions.BaseDistribution:
    if parameter.kind == "choice":
        return optuna.distributions.CategoricalDistribution(list(parameter.choices))
    if parameter.kind == "int":
        return optuna.distributions.IntDistribution(int(parameter.low), int(parameter.high))
    return optuna.distributions.FloatDistribution(parameter.low, parameter.high, log=parameter.kind == "loguniform")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=Path("search_spaces/default.yaml"))
    parser.add_argument("--configs", type=int, default=12)
    parser.add_argument("--tau", type=float, default=0.6)
    parser.add_argument("--smoke", action="store_true", help="smoke space (2 epochs), 4 configs")
    args = parser.parse_args()
    if args.smoke:
        args.space, args.configs = Path("search_spaces/smoke.yaml"), 4
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plain = load_search_space(args.space)
    methods = plain.parameters["distill.method"].choices if "distill.method" in plain.searched() else ()
    methods = [m for m in ("kd", "e2kd", "xd", "xd_e2kd") if m in methods][: args.configs]
    spec = load_search_space(args.space, {"cli_defaults": methods, "trials": max(args.configs, len(methods))})
    objectives = [name for name, _ in spec.search.objective_pairs()]
    data = prepare(spec.trial_config({}), progress=False)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.search.seed))
    distributions = {name: _distribution(p) for name, p in spec.parameters.items() if p.kind != "fixed"}
    for point in spec.cli_points():
        study.enqueue_trial(point)
    histories = []
    started = time.perf_counter()
    for index in range(args.configs):
        trial = study.ask(distributions)
        config = spec.config_for(trial.params).with_overrides({"ray.num_workers": 0})
        _, metrics = distill(config, data, progress=False, evaluate_every_epoch=True)
        histories.append(metrics["history"])
        study.tell(trial, 0.0)
        final = ", ".join(f"{name} {metrics['val'][name]:.3f}" for name in objectives)
        print(f"config {index} ({config.distill.method}, {len(metrics['history'])} epochs): {final}", flush=True)
    epochs = min(len(h) for h in histories)
    print(f"epoch  {'  '.join(f'tau({name})' for name in objectives)}")
    chosen, chosen_taus = epochs, [1.0] * len(objectives)  # no earlier epoch agrees: the last one
    for epoch in range(epochs - 1):
        taus = []
        for name in objectives:
            early = [h[epoch][name] for h in histories]
            final = [h[epochs - 1][name] for h in histories]
            tau = float(kendalltau(early, final).statistic)
            taus.append(tau if math.isfinite(tau) else 0.0)  # a constant ranking predicts nothing
        print(f"{epoch + 1:5d}  {'  '.join(f'{t:12.3f}' for t in taus)}")
        if chosen == epochs and min(taus) >= args.tau:
            chosen, chosen_taus = epoch + 1, taus
    print(f"{args.configs} configs x {epochs} epochs in {time.perf_counter() - started:.0f} s")
    print(f"first epoch where every objective's tau >= {args.tau}: {chosen}")
    shown = " ".join(f"tau_{name}={tau:.3f}" for name, tau in zip(objectives, chosen_taus, strict=True))
    print(f"RESULT grace_epochs={chosen} {shown} configs={args.configs} epochs={epochs}")


if __name__ == "__main__":
    main()
