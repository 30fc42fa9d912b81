"""Ray Tune + Optuna multi-objective search over students, feeding the Pareto registry.

Each trial is ``ray_trial.trial_driver`` (a Tune function: one worker trains in it, two or more
as a Ray Train run). The teacher and its explanation cache are prepared once, before any trial,
on the workers (xkd_ray.cluster.ray_teacher), and shared through the object store.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from xkd_ray.cluster.mo_asha import MOASHAScheduler, PruneAwareOptunaSearch
from xkd_ray.cluster.progress_callbacks import LiveTableCallback, ProgressLogCallback
from xkd_ray.cluster.ray_explain import prepare_on_workers
from xkd_ray.cluster.ray_trial import DRIVER_CPU, build_trainable, trains_in_driver
from xkd_ray.cluster.runtime_env import keep_credentials_out_of_tune
from xkd_ray.cluster.search_callbacks import RegistryCallback, current_spec, register_spec
from xkd_ray.cluster.tracking import log_search_to_parent, tracking_callbacks
from xkd_ray.config.space import Constraint, Parameter, SearchSpec
from xkd_ray.core.teacher import teacher_directory
from xkd_ray.data.streaming import check_stream_search
from xkd_ray.errors import XKDConfigError
from xkd_ray.pareto.experiment_folder import seal_tune_state
from xkd_ray.pareto.front import Objectives
from xkd_ray.pareto.front import summary as registry_summary
from xkd_ray.pareto.storage import Storage, pull_cache, push_cache, upload_registry

STUDY_NAME = "xkd"
logger = logging.getLogger(__name__)


def tune_domain(parameter: Parameter) -> Any:
    if parameter.kind == "uniform":
        return tune.uniform(parameter.low, parameter.high)
    if parameter.kind == "loguniform":
        return tune.loguniform(parameter.low, parameter.high)
    if parameter.kind == "int":
        return tune.randint(parameter.low, parameter.high + 1)
    if parameter.kind == "choice":
        return tune.choice(list(parameter.choices))
    return parameter.value


def param_space(spec: SearchSpec) -> dict[str, Any]:
    return {name: tune_domain(p) for name, p in spec.parameters.items() if p.kind != "fixed"}


VIOLATIONS = "constraint_violations"  # Optuna user attribute read by ``_constraints``


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's constraints_func: each value <= 0 when satisfied. A trial without the attribute
    (failed, pruned) counts as violating, so the sampler never prefers it."""
    return list(trial.user_attrs.get(VIOLATIONS, [1.0]))


def make_sampler(name: str, seed: int, trials: int, constrained: bool = False) -> optuna.samplers.BaseSampler:
    """Optuna's defaults assume hundreds of trials: TPE samples its first 10 at random and
    NSGA-II's first generation is 50, so a 16-trial search would be random search under another
    name. Scale the random start-up (TPE) and the population (NSGA-II) to the budget instead.
    With ``search.constraints`` TPE and NSGA-II take them as Optuna's ``constraints_func``."""
    constraints_func = _constraints if constrained else None
    if name == "nsga2":
        population = max(4, min(50, trials // 4))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population, constraints_func=constraints_func)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = max(3, min(10, trials // 3))
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=startup, constraints_func=constraints_func
    )


class XKDOptunaSearch(PruneAwareOptunaSearch):
    """Ray's OptunaSearch, telling Optuna what our trials really were: PRUNED for a trial the
    scheduler stopped (its scores are not final), and each finished trial's constraint
    violations as a user attribute before it is told, for the sampler's constraints_func."""

    def __init__(self, constraints: list[Constraint], experiment: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._constraints = constraints
        self._experiment = str(experiment)

    def restore(self, checkpoint_path: str) -> None:
        """Tuner.restore brings back the first run's searcher, space included; a resumed search
        whose space changed (``--allow-space-change``) samples from the new one."""
        experiment = self._experiment
        super().restore(checkpoint_path)
        self._experiment = experiment
        spec = current_spec(experiment, None)
        if spec is not None:
            self._space = self.convert_search_space(param_space(spec))
            self._constraints = spec.search.parsed_constraints()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._constraints and result and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            violations = [constraint.violation(result) for constraint in self._constraints]
            self._ot_trials[trial_id].set_user_attr(VIOLATIONS, violations)
        super().on_trial_complete(trial_id, result, error)


def make_searcher(spec: SearchSpec, experiment: Path, stopped: Callable[[], Container[str]]) -> OptunaSearch:
    """Optuna with a journal file inside the experiment, so the study survives a restart;
    ``search.reference`` and then ``search.initial_points`` are evaluated before the sampler
    proposes any. ``stopped`` names the trials the scheduler stopped early."""
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal"))
    )
    names, directions = zip(*spec.search.objective_pairs(), strict=True)
    # Initial points go straight into the study's queue: Optuna fills the keys a point leaves
    # out, whereas Tune's points_to_evaluate insists on every key. OptunaSearch opens the study a
    # second time (load_if_exists): Optuna's own INFO lines would read like a resume on a fresh
    # folder, so they are silenced and this says which it is.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        directions=[f"{d}imize" for d in directions],
        load_if_exists=True,
    )
    if not study.trials:
        # The reference and each method's `xkd distill` defaults first (trained as the CLI would,
        # SearchSpec.config_for), then the space's own initial points.
        for point in [*spec.cli_points(), *spec.search.initial_points]:
            study.enqueue_trial(dict(point))
        logger.info("new Optuna study in %s: %d points queued first", experiment, len(study.trials))
    else:
        logger.info("Optuna study in %s continues with %d trials", experiment, len(study.trials))
    constraints = spec.search.parsed_constraints()
    return XKDOptunaSearch(
        constraints,
        experiment,
        stopped,
        metric=list(names),
        mode=list(directions),
        sampler=make_sampler(spec.search.sampler, spec.search.seed, spec.search.trials, bool(constraints)),
        study_name=STUDY_NAME,
        storage=storage,
    )


def make_scheduler(spec: SearchSpec) -> FIFOScheduler:
    """``search.scheduler``: FIFO (every trial to its last epoch) or MO-ASHA. A trial reports
    once per epoch (Tune's ``training_iteration`` = epochs done) and once more when its student is
    saved; rungs lie below ``epochs`` (a trial stopped after its last epoch would save no training,
    only lose its final report), so a trial past the last rung always finishes."""
    settings = spec.search.scheduler
    if settings.name == "fifo":
        return FIFOScheduler()
    # The sampled trials' epochs: a CLI-default trial may train longer, but it is never stopped.
    epochs = spec.trial_config({}).distill.epochs
    return MOASHAScheduler(
        spec.search.objective_pairs(),
        time_attr="training_iteration",
        grace_period=settings.grace_epochs,
        reduction_factor=settings.reduction_factor,
        max_t=epochs,
        # The CLI-default trials are what the front is compared with: recorded at the rungs, never stopped.
        protected=spec.is_cli_point,
    )


def concurrent_trials(spec: SearchSpec) -> int:
    """How many trials fit the cluster at once: each needs its workers' CPUs (or GPUs) + a
    small driver share. Counts what the cluster has *now*; on an autoscaling cluster set
    ``search.max_concurrent_trials`` instead (see search_spaces/cifar10.yaml)."""
    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    resources = ray.cluster_resources()
    per_trial_cpu = spec.search.workers_per_trial * spec.search.cpus_per_worker
    per_trial_cpu += 0 if trains_in_driver(spec) else DRIVER_CPU
    # The epsilon absorbs float error in the division (1.4 / 0.7 = 1.9999...), before the floor.
    fitting = math.floor(resources.get("CPU", 1) / per_trial_cpu + 1e-9)
    if spec.base.ray.use_gpu:
        fitting = min(fitting, int(resources.get("GPU", 0) // spec.search.workers_per_trial))
    return max(1, fitting)


def search_callbacks(spec: SearchSpec, experiment: Path, storage: Storage | None, live: bool) -> list[tune.Callback]:
    """The registry, then the live table on a terminal or plain progress lines in a log, then
    the trackers ``search.tracking`` names (xkd_ray.cluster.tracking)."""
    objectives = Objectives.of(spec.search)
    callbacks: list[tune.Callback] = [RegistryCallback(str(experiment), spec, storage)]
    if live:
        callbacks.append(LiveTableCallback(str(experiment), objectives))
    else:
        callbacks.append(ProgressLogCallback(str(experiment), objectives, spec.search.trials))
    return callbacks


def state_api_reachable() -> bool:
    """Ray Train frees a trial's worker placement group after its controller dies (a trial the
    scheduler stopped, a lost node) only through Ray's state API, served by the dashboard: its
    PlacementGroupCleaner asks whether the controller is alive. Without it the CPUs of every
    stopped trial stay reserved and the search waits forever for them."""
    try:
        from ray.util.state import list_nodes

        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=10)
    except Exception as exc:  # any failure means the same: no state API to rely on
        logger.info("Ray's state API does not answer (%s)", exc)
        return False
    return True


def run_search(
    spec: SearchSpec,
    experiment: str | Path,
    *,
    resume: bool = False,
    live: bool = True,
    time_budget_s: float | None = None,
    storage: Storage | None = None,
) -> dict[str, Any]:
    """Run (or resume) a search; returns the registry summary. Ray must already be initialised.
    ``time_budget_s`` ends it after that many seconds (Tune's own budget; bench/search_efficiency.py).
    With ``storage`` (object storage), ``experiment`` is its local staging folder (xkd_ray.pareto.storage):
    Tune and Train write to storage, the registry is mirrored there after every trial."""
    experiment = Path(experiment).resolve()
    data_storage = check_stream_search(spec, remote=storage is not None)
    if not state_api_reachable():
        problem = "Ray's dashboard (state API) is not reachable"
        # Only Ray Train runs hold a placement group to free; a trial trained in its driver does not.
        if spec.search.scheduler.name != "fifo" and not trains_in_driver(spec):
            raise XKDConfigError(
                f"search.scheduler: {spec.search.scheduler.name} stops trials early, and {problem}: a stopped "
                "trial's CPUs would never be freed; start Ray with its dashboard (the default of `ray start`)"
            )
        warnings.warn(f"{problem}: a trial whose node is lost may wait for its old run's CPUs", stacklevel=2)
    experiment.mkdir(parents=True, exist_ok=True)
    # Trials trained in their driver checkpoint every epoch through Tune, which snapshots its state
    # before it deletes an old checkpoint (checkpoints_to_keep) and warns each time this happens
    # within 5 s: for epochs of a second or less that is a warning per epoch, by design here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = time.perf_counter()
    base = spec.trial_config({})
    cache_dir = Path(base.explain.cache_dir)
    if storage is not None:
        pull_cache(storage, cache_dir)
    data: Any
    if data_storage == "stream":
        # Shards, teacher and maps written here once, streamed (docs/DATA.md); what goes into the
        # object store is their paths and the teacher's weights, and every trial reads the shards.
        from xkd_ray.core.stream_run import prepare_stream

        data = prepare_stream(base)
    else:  # the teacher (if not cached) and its explanations (splits not cached) on the workers trials use
        workers = spec.search.workers_per_trial
        data = prepare_on_workers(base, workers=workers, use_gpu=base.ray.use_gpu, storage=storage)
    if storage is not None:
        teacher_folder = teacher_directory(base, data.splits)  # absent for a user's teacher.checkpoint
        cached = [*map(Path, data.cache_files.values()), *([teacher_folder] if teacher_folder.is_dir() else [])]
        push_cache(storage, cache_dir, cached)
    # Into the object store once; the driver keeps only the reference and what it reports. Trials
    # on a node read that node's one copy without copying it (``splits.ZeroCopyPickle``).
    shared = {"experiment": str(experiment), "spec": spec, "data_ref": ray.put(data), "storage": storage}
    cache_hits = data.cache_hits
    del data
    trainable = build_trainable(shared)
    keep_credentials_out_of_tune()  # Tune would copy the driver's AWS secret into every trial's runtime env
    register_spec(experiment, spec)  # what a restored searcher and callbacks use (``--allow-space-change``)
    tune_path, filesystem = (
        (str(experiment / "tune"), None) if storage is None else (storage.path("tune"), storage.filesystem)
    )
    # Before a restore too: the restored Tuner keeps its callbacks, and Tune's automatic loggers stay off.
    trackers, parent_run = tracking_callbacks(spec, experiment)
    if resume and tune.Tuner.can_restore(tune_path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(
            tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=filesystem
        )
    else:
        scheduler = make_scheduler(spec)
        callbacks = [*search_callbacks(spec, experiment, storage, live), *trackers]
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(spec, experiment, lambda: getattr(scheduler, "stopped", {})),
                scheduler=scheduler,
                num_samples=spec.search.trials,
                max_concurrent_trials=concurrent_trials(spec),
                time_budget_s=time_budget_s,
                # A trial trained in its driver leaves a process that has imported everything the
                # next one needs; with Ray Train the driver is a thin waiter either way.
                reuse_actors=trains_in_driver(spec),
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(experiment) if storage is None else storage.path(),
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                # Checkpoints of trials trained in their driver (Ray Train runs keep their own).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.base.ray.checkpoints_to_keep),
                callbacks=callbacks,
                verbose=0,
            ),
        )
    try:
        tuner.fit()
    finally:  # also after Ctrl-C: what the resume state on storage refers to must be there too
        if storage is not None:
            upload_registry(storage, experiment)
            seal_tune_state(storage, experiment)  # Tune has stopped writing: sign its state for --resume
    summary = registry_summary(experiment) or {}
    log_search_to_parent(spec, experiment, parent_run, summary)
    summary["wall_seconds"] = time.perf_counter() - started
    summary["explanations_from_cache"] = cache_hits
    return summary
