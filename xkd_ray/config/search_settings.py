"""The ``search`` section of a space file: budget, sampler, objectives, constraints, the
scheduler, the reference and the initial points. Validated by pydantic like the experiment
config; the rules that need the whole space (keys, ranges) live in xkd_ray.config.space."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from xkd_ray.config.methods import METHODS
from xkd_ray.config.schema import PositiveFloat, Schema, Seed, rule
from xkd_ray.core.metrics import METRICS

SAMPLERS = ("tpe", "nsga2", "random")
SCHEDULERS = ("fifo", "mo_asha")  # built in xkd_ray.cluster.ray_search.make_scheduler
TRACKERS = ("mlflow", "tensorboard")  # built in xkd_ray.cluster.tracking


class Objective(Schema):
    """One objective of the search: any registered metric; its direction defaults to the
    registry's (``params`` and ``latency_ms`` are minimised, accuracy maximised)."""

    where: ClassVar[str] = "search.objectives"
    metric: Literal[*METRICS]
    direction: Literal["max", "min"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _registry_direction(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("direction") is None and raw.get("metric") in METRICS:
            return {**raw, "direction": METRICS[raw["metric"]].direction}
        return raw


CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Constraint:
    """``metric >= value`` or ``metric <= value`` on a trial's validation metrics."""

    metric: str
    operator: str
    value: float

    def violation(self, metrics: dict[str, Any]) -> float:
        """Optuna's convention: <= 0 when satisfied, else by how much it is missed (a missing or
        non-finite metric counts as violated by 1)."""
        measured = metrics.get(self.metric)
        if measured is None or not math.isfinite(float(measured)):
            return 1.0
        return self.value - float(measured) if self.operator == ">=" else float(measured) - self.value

    def __str__(self) -> str:
        return f"{self.metric} {self.operator} {self.value:g}"


def parse_constraint(text: str) -> Constraint:
    found = CONSTRAINT.match(text) if isinstance(text, str) else None
    if found is None:
        raise ValueError(f"{text!r} is not 'metric >= value' or 'metric <= value'")
    metric, operator, value = found.groups()
    if metric not in METRICS:
        raise ValueError(f"{text!r}: unknown metric {metric!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{text!r}: {value!r} is not a number") from None
    return Constraint(metric, operator, number)


class SchedulerSettings(Schema):
    """How trials are stopped early: ``fifo`` runs every trial to the end; ``mo_asha`` is
    multi-objective asynchronous successive halving (xkd_ray.cluster.mo_asha) with rungs at
    grace_epochs * reduction_factor^k epochs."""

    where: ClassVar[str] = "search.scheduler"
    name: Literal[*SCHEDULERS] = "fifo"
    grace_epochs: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[int, Field(ge=2)] = 3


DEFAULT_OBJECTIVES = [{"metric": "accuracy"}, {"metric": "fidelity"}]


class SearchSettings(Schema):
    """The budget and sampler of a search; the worker settings become each trial's ``ray``."""

    where: ClassVar[str] = "search"
    trials: Annotated[int, Field(ge=1)] = 16
    sampler: Literal[*SAMPLERS] = "tpe"
    seed: Seed = 0
    workers_per_trial: Annotated[int, Field(ge=1)] = 1
    cpus_per_worker: PositiveFloat = 1.0
    max_concurrent_trials: Annotated[int, Field(ge=1)] | None = None
    max_failures: Annotated[int, Field(ge=0)] = 1
    # A one-worker trial trains inside its Tune trial process (no Ray Train run: no controller,
    # no worker process; Tune's checkpoints, retries from them, and reuses the process for the
    # next trial). False: every trial is a Ray Train run, as trials of 2+ workers always are.
    one_worker_in_driver: bool = True
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(**o) for o in DEFAULT_OBJECTIVES])
    constraints: list[str] = Field(default=[])
    # One value per objective: the worst point the hypervolume counts from. Defaults to 0 for
    # maximised objectives; a minimised one (params, latency_ms) has no natural worst, so set it.
    hypervolume_reference: list[float] | None = None
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    # The configuration the search must beat: what `xkd distill` trains with its CLI defaults
    # (every student.* and distill.* key at the config default, including distill.epochs) on the
    # base's data, teacher and explainer, plus these {dotted key: value} (e.g. the method).
    # Evaluated first, drawn on the front plot and compared with the front in summary.json.
    reference: dict[str, Any] | None = None
    # Methods whose `xkd distill --method M` defaults are evaluated first (after the reference),
    # so the sampler starts from what a user gets without searching and the front can only
    # improve on it. Each is trained exactly as the CLI would (see ``reference``).
    cli_defaults: list[Literal[*METHODS]] = Field(default=[])
    # Where trials are tracked besides the experiment folder (xkd_ray.cluster.tracking): each trial
    # a run with its config and per-epoch metrics; with mlflow, a parent run with the front.
    tracking: list[Literal[*TRACKERS]] = Field(default_factory=lambda: ["tensorboard"])
    # MLflow's store: None is a SQLite file in the experiment folder; a server URI on a cluster.
    tracking_uri: str | None = None
    # Configurations to try first (e.g. a known-good setting), each a partial {dotted key: value}
    # over the searched keys; the sampler fills in the rest. They count towards ``trials``.
    initial_points: list[dict[str, Any]] = Field(default=[])  # pydantic copies it per instance

    @field_validator("constraints")
    @classmethod
    def _parse_constraints(cls, value: list[str]) -> list[str]:
        for index, text in enumerate(value):
            try:
                parse_constraint(text)
            except ValueError as exc:
                raise rule(f"search.constraints[{index}]", str(exc)) from None
        return value

    @model_validator(mode="after")
    def _points_fit_the_budget(self) -> SearchSettings:
        if len(set(self.cli_defaults)) != len(self.cli_defaults):
            raise rule("search.cli_defaults", f"lists a method twice: {self.cli_defaults}")
        points = len(self.initial_points) + len(self.cli_point_givens())
        if points > self.trials:
            raise rule(
                "search.initial_points",
                f"{points} points but search.trials={self.trials} (search.reference and each of "
                "search.cli_defaults count as one); raise trials or drop points",
            )
        names = [o.metric for o in self.objectives]
        if len(names) < 2 or len(set(names)) != len(names):
            raise rule("search.objectives", f"needs 2 or more different metrics, got {names}")
        if self.hypervolume_reference is None:
            unset = [o.metric for o in self.objectives if o.direction == "min"]
            if unset:
                raise rule("search.hypervolume_reference", f"set one value per objective ({unset[0]} is minimised)")
        elif len(self.hypervolume_reference) != len(names):
            raise rule(
                "search.hypervolume_reference",
                f"{len(self.hypervolume_reference)} values for {len(names)} objectives ({', '.join(names)})",
            )
        return self

    def cli_point_givens(self) -> list[dict[str, Any]]:
        """What each CLI-default trial sets over the CLI's defaults: the reference first, then
        ``{distill.method: M}`` per listed method (the reference's own method only once)."""
        givens = [dict(self.reference)] if self.reference is not None else []
        for method in self.cli_defaults:
            if {"distill.method": method} not in givens:
                givens.append({"distill.method": method})
        return givens

    def objective_pairs(self) -> list[tuple[str, str]]:
        """(metric, direction) per objective, in the space file's order."""
        return [(o.metric, str(o.direction)) for o in self.objectives]

    def reference_point(self) -> list[float]:
        """The hypervolume's reference point: as given, or 0 for each (maximised) objective."""
        return list(self.hypervolume_reference or [0.0] * len(self.objectives))

    def parsed_constraints(self) -> list[Constraint]:
        return [parse_constraint(text) for text in self.constraints]
