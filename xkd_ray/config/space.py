"""Search spaces: one YAML per search, parsed and validated before Ray starts.

A space file has three sections::

    base:      an experiment config (same sections as `xkd distill --config`): fixed values
    space:     dotted config keys -> {uniform: [lo, hi]} | {loguniform: [lo, hi]} |
               {int: [lo, hi]} | {choice: [a, b, ...]} | a plain value (fixed)
    search:    trials, sampler, seed, workers_per_trial, initial_points, ...

``SearchSpec.trial_config`` is the one definition of a trial's config, and the space is checked
against it at load, so a trial cannot fail inside a Ray worker on a value the space allowed.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from xkd_ray.config.schema import ExperimentConfig, PositiveFloat, Schema, Seed, config_error, read_yaml, rule
from xkd_ray.core.metrics import METRICS
from xkd_ray.errors import XKDConfigError

SAMPLERS = ("tpe", "nsga2", "random")
SCHEDULERS = ("fifo", "mo_asha")  # built in xkd_ray.cluster.ray_search.make_scheduler
KINDS = ("uniform", "loguniform", "int", "choice")
ENUMERATED_INT_VALUES = 16  # int ranges up to this many values are checked value by value
MAX_COMBINATIONS = 4096  # probe combinations checked together (~20 us each)


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # uniform | loguniform | int | choice | fixed
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None

    def probes(self) -> list[Any]:
        """The values a check tries. Every config rule is an interval on a float (ends suffice) or
        a bound/divisibility rule on an int: two neighbouring ints catch any divisibility, so a
        long int range is probed at both ends and their neighbours. A float range is probed with
        floats, as the sampler draws them (so ``uniform`` over an int key is refused)."""
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "choice":
            return list(self.choices)
        if self.kind != "int":
            return [float(self.low), float(self.high)]
        low, high = int(self.low), int(self.high)
        if high - low < ENUMERATED_INT_VALUES:
            return list(range(low, high + 1))
        return [low, low + 1, high - 1, high]


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
    # The configuration the search must beat (usually the defaults a user would train by hand):
    # a partial {dotted key: value} over the searched keys, evaluated first, drawn on the front
    # plot and compared with the front in summary.json.
    reference: dict[str, Any] | None = None
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
        points = len(self.initial_points) + (self.reference is not None)
        if points > self.trials:
            raise rule(
                "search.initial_points",
                f"{points} points but search.trials={self.trials} (search.reference counts as one); "
                "raise trials or drop points",
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

    def objective_pairs(self) -> list[tuple[str, str]]:
        """(metric, direction) per objective, in the space file's order."""
        return [(o.metric, str(o.direction)) for o in self.objectives]

    def reference_point(self) -> list[float]:
        """The hypervolume's reference point: as given, or 0 for each (maximised) objective."""
        return list(self.hypervolume_reference or [0.0] * len(self.objectives))

    def parsed_constraints(self) -> list[Constraint]:
        return [parse_constraint(text) for text in self.constraints]


@dataclass
class SearchSpec:
    base: ExperimentConfig
    parameters: dict[str, Parameter]
    search: SearchSettings = field(default_factory=SearchSettings)

    def fixed_overrides(self) -> dict[str, Any]:
        return {name: p.value for name, p in self.parameters.items() if p.kind == "fixed"}

    def reference_point(self) -> dict[str, Any] | None:
        """``search.reference`` completed with the base config's value for every searched key it
        leaves out: the configuration a user gets without searching."""
        if self.search.reference is None:
            return None
        shared = self.trial_config({}).to_dict()
        searched = [name for name, p in self.parameters.items() if p.kind != "fixed"]
        base = {name: shared[name.partition(".")[0]][name.partition(".")[2]] for name in searched}
        given = self.search.reference
        return {**given, **{name: value for name, value in base.items() if name not in given}}

    def trial_config(self, sampled: dict[str, Any]) -> ExperimentConfig:
        """The full config of one trial: base, the search's worker settings, the space's fixed
        values, then the sampled values, validated once as a whole."""
        workers = {"ray.num_workers": self.search.workers_per_trial, "ray.cpus_per_worker": self.search.cpus_per_worker}
        return self.base.with_overrides({**workers, **self.fixed_overrides(), **sampled})


def _parse_parameter(name: str, raw: Any) -> Parameter:
    if not isinstance(raw, dict):
        return Parameter(name, "fixed", value=raw)
    if len(raw) != 1 or next(iter(raw)) not in KINDS:
        raise XKDConfigError(
            f"space.{name}: expected one of {{{', '.join(KINDS)}}}: ..., or a plain value; got {raw!r}"
        )
    kind, arguments = next(iter(raw.items()))
    if kind == "choice":
        if not isinstance(arguments, list):
            raise XKDConfigError(f"space.{name}: choice must be a list, got {type(arguments).__name__}")
        if not arguments:
            raise XKDConfigError(f"space.{name}: choice list is empty")
        return Parameter(name, kind, choices=tuple(arguments))
    if not (isinstance(arguments, list) and len(arguments) == 2):
        raise XKDConfigError(f"space.{name}: {kind} needs [low, high], got {arguments!r}")
    low, high = arguments
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise XKDConfigError(f"space.{name}: bounds must be finite numbers, got {arguments!r}")
    if not low < high:
        raise XKDConfigError(f"space.{name}: empty range [{low}, {high}]; low must be < high")
    if kind == "loguniform" and low <= 0:
        raise XKDConfigError(f"space.{name}: loguniform needs low > 0, got {low}")
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise XKDConfigError(f"space.{name}: int bounds must be integers, got {arguments!r}")
    return Parameter(name, kind, low=low, high=high)


def _check_values(spec: SearchSpec) -> None:
    """Validate the space against ``trial_config``, so rules between keys hold for every trial.

    The base with the worker settings and fixed values must be valid by itself (callers use
    ``trial_config({})`` for what all trials share). Then each key's probe values one at a time
    (the other searched keys at their first probe), which names the key at fault; then every
    combination of probe values across keys, which catches rules between searched keys
    (``student.ae_depth`` 4 with ``data.image_size`` 16).
    Remaining gap: a space with more than ``MAX_COMBINATIONS`` probe combinations is checked
    only at the all-first and all-last corners, and an int range longer than
    ``ENUMERATED_INT_VALUES`` only at its ends and their neighbours (an interior value can
    still break a rule, e.g. ``ray.num_workers`` 3 within [1, 20] with a batch of 64).
    """
    defaults = spec.base.to_dict()
    for name in spec.parameters:
        section, _, key = name.partition(".")
        if section not in defaults or key not in defaults[section]:
            raise XKDConfigError(f"space.{name}: unknown key; keys look like distill.temperature or student.ae_depth")
    try:  # the config shared by all trials (``trial_config({})``, e.g. the data every trial reads)
        spec.trial_config({})
    except XKDConfigError as exc:
        raise XKDConfigError(f"base: not valid with the search's worker settings and fixed values ({exc})") from None
    searched = {name: p.probes() for name, p in spec.parameters.items() if p.kind != "fixed"}
    reference = {name: values[0] for name, values in searched.items()}
    for name, parameter in spec.parameters.items():
        for value in parameter.probes():
            try:
                spec.trial_config({**reference, name: value})
            except XKDConfigError as exc:
                raise XKDConfigError(f"space.{name}: value {value!r} is not valid ({exc})") from None
    if math.prod(len(values) for values in searched.values()) <= MAX_COMBINATIONS:
        combinations = itertools.product(*searched.values())
    else:
        combinations = iter([[v[0] for v in searched.values()], [v[-1] for v in searched.values()]])
    for combination in combinations:
        point = dict(zip(searched, combination, strict=True))
        try:
            spec.trial_config(point)
        except XKDConfigError as exc:
            raise XKDConfigError(f"space: the trial {point} is not valid ({exc})") from None


def _check_initial_points(spec: SearchSpec) -> None:
    """Each point may only name searched keys, with a value its range or choice list allows; the
    keys it leaves out are filled by the sampler, tried here at their first and last probes."""
    searched = {name: p.probes() for name, p in spec.parameters.items() if p.kind != "fixed"}
    points = [(f"search.initial_points[{i}]", point) for i, point in enumerate(spec.search.initial_points)]
    if spec.search.reference is not None:
        points.insert(0, ("search.reference", spec.reference_point()))
    for where, point in points:
        for name, value in point.items():
            parameter = spec.parameters.get(name)
            if parameter is None or parameter.kind == "fixed":
                raise XKDConfigError(f"{where}.{name}: not a searched key; searched keys are {', '.join(searched)}")
            if parameter.kind == "choice":
                if value not in parameter.choices:
                    raise XKDConfigError(f"{where}.{name}: {value!r} is not one of {list(parameter.choices)}")
            elif not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and parameter.low <= value <= parameter.high
            ):
                raise XKDConfigError(f"{where}.{name}: {value!r} is outside [{parameter.low}, {parameter.high}]")
            if parameter.kind == "int" and not isinstance(value, int):
                raise XKDConfigError(f"{where}.{name}: {value!r} must be an integer")
        for end in (0, -1):
            try:
                spec.trial_config({**{name: values[end] for name, values in searched.items()}, **point})
            except XKDConfigError as exc:
                raise XKDConfigError(f"{where}: not a valid configuration ({exc})") from None


def parse_search_space(raw: Any, source: str = "<dict>") -> SearchSpec:
    if not isinstance(raw, dict):
        raise XKDConfigError(f"{source}: a search space is a mapping with sections base, space, search")
    unknown = sorted(str(name) for name in set(raw) - {"base", "space", "search"})
    if unknown:
        raise XKDConfigError(f"{source}: {unknown[0]}: unknown section; allowed sections are base, space, search")
    if not isinstance(raw.get("base") or {}, dict):
        raise XKDConfigError(f"{source}: base: must be a mapping of config sections")
    try:
        base = ExperimentConfig.from_dict(raw.get("base") or {})
    except XKDConfigError as exc:
        raise XKDConfigError(f"base.{exc}") from None
    space = raw.get("space") or {}
    if not isinstance(space, dict) or not space:
        raise XKDConfigError(f"{source}: space: must be a non-empty mapping of config keys to ranges")
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict):
        raise XKDConfigError(f"{source}: search: must be a mapping")
    try:
        search = SearchSettings.model_validate(search_raw)
    except ValidationError as exc:
        raise config_error(exc, SearchSettings) from None
    spec = SearchSpec(
        base=base,
        parameters={str(name): _parse_parameter(str(name), value) for name, value in space.items()},
        search=search,
    )
    _check_values(spec)
    _check_initial_points(spec)
    scheduler = spec.search.scheduler
    if scheduler.name != "fifo" and scheduler.grace_epochs >= spec.base.distill.epochs:
        raise XKDConfigError(
            f"search.scheduler.grace_epochs: {scheduler.grace_epochs} leaves no epoch to stop early "
            f"(base.distill.epochs is {spec.base.distill.epochs})"
        )
    return spec


def _with_base_overrides(raw: Any, base_overrides: dict[str, Any]) -> Any:
    """Set dotted config keys in the raw ``base`` section; the parser then validates them with it."""
    if not isinstance(raw, dict) or not isinstance(raw.get("base") or {}, dict):
        return raw  # the parser reports the malformed file
    base = copy.deepcopy(raw.get("base") or {})
    for dotted, value in base_overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            raise XKDConfigError(f"base.{dotted}: override keys look like section.key, e.g. ray.use_gpu")
        values = base.get(section)
        if values is None or isinstance(values, dict):
            base[section] = {**(values or {}), key: value}
    return {**raw, "base": base}


def load_search_space(
    path: str | Path, overrides: dict[str, Any] | None = None, base_overrides: dict[str, Any] | None = None
) -> SearchSpec:
    """Read and validate a space file. ``overrides`` replace ``search`` settings (e.g. trials);
    ``base_overrides`` set dotted config keys of ``base`` (the CLI's ``--gpu``: ray.use_gpu)."""
    path = Path(path)
    raw = read_yaml(path, "search space file")
    if overrides and isinstance(raw, dict):
        search = raw.get("search") or {}
        raw = {**raw, "search": {**search, **overrides}} if isinstance(search, dict) else raw
    try:
        if base_overrides:
            raw = _with_base_overrides(raw, base_overrides)
        return parse_search_space(raw, source=str(path))
    except XKDConfigError as exc:
        message = str(exc)
        raise XKDConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
