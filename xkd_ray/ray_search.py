"""Ray Tune + Optuna multi-objective search over students, feeding the Pareto registry.

Ray 2.60 runs Ray Train V2, where a ``TorchTrainer`` is not a Tune trainable: each trial is a
small *driver function* that builds its own ``TorchTrainer`` (named after the trial id, so a
restored search resumes the inner run from its checkpoints) and forwards the workers' reports
to Tune with ``TuneReportCallback``. A trial with one worker (``search.one_worker_in_driver``,
the default) has nothing to shard: its driver runs the same training loop itself, with Tune's
checkpoints and Tune's retry from the last one, and Tune reuses the driver process for the next
trial, so such a trial starts no process at all (measured in bench/trial_overhead.py). The
teacher and its explanation cache are prepared once, before any trial, on the workers
(xkd_ray.ray_teacher), and shared through the object store.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from xkd_ray.config import ExperimentConfig
from xkd_ray.distill import final_metrics, save_student
from xkd_ray.errors import XKDConfigError, XKDTrainingDiverged
from xkd_ray.faults import fault_rule
from xkd_ray.mo_asha import MOASHAScheduler, PruneAwareOptunaSearch
from xkd_ray.pareto import Objectives
from xkd_ray.pareto import summary as registry_summary
from xkd_ray.prepared import DistillData
from xkd_ray.ray_teacher import prepare_on_workers
from xkd_ray.ray_train import LoopSession, make_trainer, student_from_checkpoint, train_student_loop
from xkd_ray.search_callbacks import LiveTableCallback, RegistryCallback
from xkd_ray.space import Constraint, Parameter, SearchSpec
from xkd_ray.storage import Storage, pull_cache, push_cache, upload_registry
from xkd_ray.teacher import teacher_directory

STUDY_NAME = "xkd"
DRIVER_CPU = 0.1  # a trial's driver only waits on its Ray Train run; Tune refuses 0


def trains_in_driver(spec: SearchSpec) -> bool:
    """Whether trials train inside their Tune driver (one worker, ``search.one_worker_in_driver``)."""
    return spec.search.workers_per_trial == 1 and spec.search.one_worker_in_driver


def in_driver_session() -> LoopSession:
    """The training loop's session inside a Tune trial: one rank, the trial's GPU if it has one,
    Tune's checkpoint (a retried or resumed trial) and Tune's report."""
    import torch

    device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        tune.report(metrics, checkpoint=None if folder is None else tune.Checkpoint.from_directory(folder))

    return LoopSession(
        world=1,
        rank=0,
        device=device,
        checkpoint=tune.get_checkpoint(),
        report=report,
        prepare_model=lambda model: model.to(device),
        prepare_loader=lambda loader: loader,
    )


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

    def __init__(self, constraints: list[Constraint], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._constraints = constraints

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
    # out, whereas Tune's points_to_evaluate insists on every key.
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        directions=[f"{d}imize" for d in directions],
        load_if_exists=True,
    )
    if not study.trials:
        reference = [spec.reference_point()] if spec.search.reference is not None else []
        for point in [*reference, *spec.search.initial_points]:
            study.enqueue_trial(dict(point))
    constraints = spec.search.parsed_constraints()
    return XKDOptunaSearch(
        constraints,
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
    return MOASHAScheduler(
        spec.search.objective_pairs(),
        time_attr="training_iteration",
        grace_period=settings.grace_epochs,
        reduction_factor=settings.reduction_factor,
        max_t=spec.base.distill.epochs,
    )


def _report_diverged(config: ExperimentConfig, objectives: list[str]) -> None:
    """NaN objectives: the one divergence sentinel (Optuna records the trial as failed, never as a point)."""
    nan = float("nan")
    _wait_for_forwarded_reports()
    tune.report({**dict.fromkeys(objectives, nan), "status": "diverged", "experiment_config": config.to_dict()})


def _wait_for_forwarded_reports(timeout_s: float = 60.0) -> None:
    """Wait until Tune has taken every epoch report ``TuneReportCallback`` forwarded, before the
    driver's own final ``tune.report``. In Ray 2.60 both go through the trial's one-slot result
    queue: a forwarded report still in flight when the final one is put deadlocks the trial (its
    main thread blocks putting the forwarded report, its training thread putting the final one;
    seen in a test run, both threads stuck in ``Queue.put``). Two quiet polls 0.1 s apart close
    the window where the main thread has taken a forwarded report but not yet queued it."""
    from ray.train._internal.session import get_session

    session = get_session()
    forwarded = getattr(session, "_inter_actor_queue", None) if session is not None else None
    if session is None:
        return
    deadline, quiet = time.monotonic() + timeout_s, 0
    while quiet < 2 and time.monotonic() < deadline:
        busy = (forwarded is not None and not forwarded.empty()) or not session.result_queue.empty()
        quiet = 0 if busy else quiet + 1
        time.sleep(0.1)


def trial_driver(sampled: dict[str, Any], *, shared: dict[str, Any]) -> None:
    """One trial: train a student with Ray Train, save it, report its final validation metrics.
    The final report's ``timings`` stamps the driver's phases (bench/trial_overhead.py)."""
    entered = time.time()
    from xkd_ray.ray_train import process_started_at, quick_polling

    experiment = Path(shared["experiment"])
    spec: SearchSpec = shared["spec"]
    config = spec.trial_config(sampled)
    objectives = [name for name, _ in spec.search.objective_pairs()]
    if fault_rule("fail_driver", config.to_dict()) is not None:
        raise RuntimeError("injected fault: fail_driver (XKD_FAULTS), so this trial's driver fails on purpose")
    data: DistillData = ray.get(shared["data_ref"])
    trial_id = tune.get_context().get_trial_id()
    storage: Storage | None = shared.get("storage")
    train_path = experiment / "train" if storage is None else storage.path("train")
    fit_called = time.time()
    if trains_in_driver(spec):
        # The fault hook's once-per-run marker needs a folder this node sees (as in build_trainer).
        run_folder = Path(train_path if storage is None else Path(tempfile.gettempdir()) / "xkd-runs") / trial_id
        loop_config = {"config": config.to_dict(), "run_folder": str(run_folder), "objectives": objectives}
        trained = train_student_loop({**loop_config, "data_ref": shared["data_ref"]}, in_driver_session())
        fit_returned = time.time()
        if trained is None:
            _report_diverged(config, objectives)
            return
        student, history = trained
    else:
        trainer = make_trainer(
            config,
            shared["data_ref"],
            name=f"trial-{trial_id}",
            storage_path=train_path,
            callbacks=[TuneReportCallback()],
            objectives=objectives,
            storage_filesystem=None if storage is None else storage.filesystem,
        )
        with quick_polling():  # Ray Train moves one report per poll: poll every 0.25 s, not every 2 s
            result = trainer.fit()
        fit_returned = time.time()
        try:
            student, history = student_from_checkpoint(config, data, result.checkpoint)
        except XKDTrainingDiverged:
            _report_diverged(config, objectives)
            return
    # Each resume from a checkpoint (after a worker or node died) starts a new start_epoch.
    resumed = len({int(record["start_epoch"]) for record in history}) - 1
    val = final_metrics(history)
    metrics = {"val": val, "teacher": data.teacher_metrics}
    if storage is None:
        student_dir = str(experiment / "students" / trial_id)
        save_student(student_dir, config, student, data, metrics)
    else:  # this node's disk is not the search driver's: the student goes to storage, named relative to it
        student_dir = f"students/{trial_id}"
        with tempfile.TemporaryDirectory(prefix="xkd-student-") as local:
            storage.upload(save_student(Path(local) / trial_id, config, student, data, metrics), student_dir)
    _wait_for_forwarded_reports()
    tune.report(
        {
            **val,
            "status": "ok",
            "epochs_trained": len({int(record["epoch"]) for record in history}),
            "nodes": {
                "driver": ray.get_runtime_context().get_node_id(),
                "workers": sorted({node for record in history for node in record.get("node_ids", [])}),
            },
            "student_dir": student_dir,
            "resumed_from_checkpoint": resumed,
            "experiment_config": config.to_dict(),
            "timings": {
                "driver_process_started": process_started_at(),
                "driver_entered": entered,
                "fit_called": fit_called,
                "fit_returned": fit_returned,
                "driver_reported": time.time(),
            },
        }
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


def build_trainable(shared: dict[str, Any]) -> Any:
    """The Tune trainable: a small driver that waits on its Ray Train run, or, training in its
    driver, a process with one worker's resources."""
    spec: SearchSpec = shared["spec"]
    resources: dict[str, float] = {"cpu": DRIVER_CPU}
    if trains_in_driver(spec):
        resources = {"cpu": spec.search.cpus_per_worker, "gpu": 1 if spec.base.ray.use_gpu else 0}
    return tune.with_resources(tune.with_parameters(trial_driver, shared=shared), resources)


def state_api_reachable() -> bool:
    """Ray Train frees a trial's worker placement group after its controller dies (a trial the
    scheduler stopped, a lost node) only through Ray's state API, served by the dashboard: its
    PlacementGroupCleaner asks whether the controller is alive. Without it the CPUs of every
    stopped trial stay reserved and the search waits forever for them."""
    try:
        from ray.util.state import list_nodes

        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=10)
    except Exception:
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
    With ``storage`` (object storage), ``experiment`` is its local staging folder (xkd_ray.storage):
    Tune and Train write to storage, the registry is mirrored there after every trial."""
    experiment = Path(experiment).resolve()
    if not state_api_reachable():
        problem = "Ray's dashboard (state API) is not reachable"
        if spec.search.scheduler.name != "fifo":
            raise XKDConfigError(
                f"search.scheduler: {spec.search.scheduler.name} stops trials early, and {problem}: a stopped "
                "trial's CPUs would never be freed; start Ray with its dashboard (the default of `ray start`)"
            )
        warnings.warn(f"{problem}: a trial whose node is lost may wait for its old run's CPUs", stacklevel=2)
    experiment.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = spec.trial_config({})
    cache_dir = Path(base.explain.cache_dir)
    if storage is not None:
        pull_cache(storage, cache_dir)
    # The teacher (if not cached) and its explanations (splits not cached) on the workers trials use.
    data = prepare_on_workers(base, workers=spec.search.workers_per_trial, use_gpu=base.ray.use_gpu, storage=storage)
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
    tune_path, filesystem = (
        (str(experiment / "tune"), None) if storage is None else (storage.path("tune"), storage.filesystem)
    )
    if resume and tune.Tuner.can_restore(tune_path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(
            tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=filesystem
        )
    else:
        scheduler = make_scheduler(spec)
        callbacks: list[tune.Callback] = [RegistryCallback(str(experiment), spec, storage)]
        if live:
            callbacks.append(LiveTableCallback(str(experiment), Objectives.of(spec.search)))
        tuner = tune.Tuner(
            trainable,
            param_space={name: tune_domain(p) for name, p in spec.parameters.items() if p.kind != "fixed"},
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
    summary = registry_summary(experiment) or {}
    summary["wall_seconds"] = time.perf_counter() - started
    summary["explanations_from_cache"] = cache_hits
    return summary
