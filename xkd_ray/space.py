"""Search spaces: one YAML per search, parsed and validated before Ray starts.

A space file has three sections::

    base:      an experiment config (same sections as `xkd distill --config`): fixed values
    space:     dotted config keys -> {uniform: [lo, hi]} | {loguniform: [lo, hi]} |
               {int: [lo, hi]} | {choice: [a, b, ...]} | a plain value (fixed)
    search:    trials, sampler, seed, workers_per_trial, initial_points, ...

Every sampled value is checked against the config's own validation (both ends of each
range, every choice) so a trial can never fail on a value the space allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xkd_ray.config import ExperimentConfig
from xkd_ray.errors import XKDConfigError

SAMPLERS = ("tpe", "nsga2", "random")
KINDS = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # uniform | loguniform | int | choice | fixed
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None


@dataclass
class SearchSettings:
    trials: int = 16
    sampler: str = "tpe"
    seed: int = 0
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    max_concurrent_trials: int | None = None
    max_failures: int = 1
    hypervolume_reference: tuple[float, float] = (0.0, 0.0)
    # Configurations to try first (e.g. a known-good setting), each a partial {dotted key: value}
    # over the searched keys; the sampler fills in the rest. They count towards ``trials``.
    initial_points: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise XKDConfigError(f"search.trials: got {self.trials!r}; must be an integer >= 1")
        if self.sampler not in SAMPLERS:
            raise XKDConfigError(f"search.sampler: got {self.sampler!r}; allowed values are {', '.join(SAMPLERS)}")
        if isinstance(self.workers_per_trial, bool) or not isinstance(self.workers_per_trial, int):
            raise XKDConfigError(f"search.workers_per_trial: got {self.workers_per_trial!r}; must be an integer >= 1")
        if self.workers_per_trial < 1:
            raise XKDConfigError(f"search.workers_per_trial: got {self.workers_per_trial}; must be >= 1")
        if not isinstance(self.cpus_per_worker, (int, float)) or self.cpus_per_worker <= 0:
            raise XKDConfigError(f"search.cpus_per_worker: got {self.cpus_per_worker!r}; must be > 0")
        if self.max_concurrent_trials is not None and (
            not isinstance(self.max_concurrent_trials, int) or self.max_concurrent_trials < 1
        ):
            raise XKDConfigError(f"search.max_concurrent_trials: got {self.max_concurrent_trials!r}; must be >= 1")
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise XKDConfigError(f"search.max_failures: got {self.max_failures!r}; must be an integer >= 0")
        reference = self.hypervolume_reference
        if not (isinstance(reference, (list, tuple)) and len(reference) == 2):
            raise XKDConfigError("search.hypervolume_reference: must be [accuracy, fidelity]")
        self.hypervolume_reference = (float(reference[0]), float(reference[1]))
        if not isinstance(self.initial_points, list) or not all(isinstance(p, dict) for p in self.initial_points):
            raise XKDConfigError("search.initial_points: must be a list of mappings {dotted key: value}")
        if len(self.initial_points) > self.trials:
            raise XKDConfigError(
                f"search.initial_points: {len(self.initial_points)} points but search.trials={self.trials}; "
                "raise trials or drop points"
            )


@dataclass
class SearchSpec:
    base: ExperimentConfig
    parameters: dict[str, Parameter]
    search: SearchSettings = field(default_factory=SearchSettings)
    source: str = "<dict>"

    def fixed_overrides(self) -> dict[str, Any]:
        return {name: p.value for name, p in self.parameters.items() if p.kind == "fixed"}

    def trial_config(self, sampled: dict[str, Any]) -> ExperimentConfig:
        """The full config of one trial: base, fixed values, then the sampled values."""
        return self.base.with_overrides({**self.fixed_overrides(), **sampled})


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
    """Validate every choice and both ends of every range against the config itself."""
    defaults = spec.base.to_dict()
    for name, parameter in spec.parameters.items():
        section, _, key = name.partition(".")
        if section not in defaults or key not in defaults[section]:
            raise XKDConfigError(f"space.{name}: unknown key; keys look like distill.temperature or student.ae_depth")
        if parameter.kind == "fixed":
            values = [parameter.value]
        elif parameter.kind == "choice":
            values = list(parameter.choices)
        else:
            values = [parameter.low, parameter.high]
        for value in values:
            try:
                spec.trial_config({name: value})
            except XKDConfigError as exc:
                raise XKDConfigError(f"space.{name}: value {value!r} is not valid ({exc})") from None


def _check_initial_points(spec: SearchSpec) -> None:
    """Each point may only name searched keys, with a value its range or choice list allows."""
    for index, point in enumerate(spec.search.initial_points):
        where = f"search.initial_points[{index}]"
        for name, value in point.items():
            parameter = spec.parameters.get(name)
            if parameter is None or parameter.kind == "fixed":
                searched = ", ".join(n for n, p in spec.parameters.items() if p.kind != "fixed")
                raise XKDConfigError(f"{where}.{name}: not a searched key; searched keys are {searched}")
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
        try:
            spec.trial_config(point)
        except XKDConfigError as exc:
            raise XKDConfigError(f"{where}: not a valid configuration ({exc})") from None


def parse_search_space(raw: Any, source: str = "<dict>") -> SearchSpec:
    if not isinstance(raw, dict):
        raise XKDConfigError(f"{source}: a search space is a mapping with sections base, space, search")
    unknown = sorted(set(raw) - {"base", "space", "search"})
    if unknown:
        raise XKDConfigError(f"{source}: {unknown[0]}: unknown section; allowed sections are base, space, search")
    base = ExperimentConfig.from_dict(raw.get("base") or {})
    space = raw.get("space") or {}
    if not isinstance(space, dict) or not space:
        raise XKDConfigError(f"{source}: space: must be a non-empty mapping of config keys to ranges")
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict):
        raise XKDConfigError(f"{source}: search: must be a mapping")
    allowed = set(SearchSettings.__dataclass_fields__)
    bad = sorted(set(search_raw) - allowed)
    if bad:
        raise XKDConfigError(f"{source}: search.{bad[0]}: unknown key; allowed keys are {', '.join(sorted(allowed))}")
    spec = SearchSpec(
        base=base,
        parameters={str(name): _parse_parameter(str(name), value) for name, value in space.items()},
        search=SearchSettings(**search_raw),
        source=source,
    )
    _check_values(spec)
    _check_initial_points(spec)
    return spec


def load_search_space(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchSpec:
    """Read and validate a space file; ``overrides`` replace ``search`` settings (e.g. trials)."""
    path = Path(path)
    if not path.is_file():
        raise XKDConfigError(f"{path}: search space file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise XKDConfigError(f"{path}: not valid YAML ({exc})") from exc
    if overrides and isinstance(raw, dict):
        raw = {**raw, "search": {**(raw.get("search") or {}), **overrides}}
    try:
        return parse_search_space(raw, source=str(path))
    except XKDConfigError as exc:
        message = str(exc)
        raise XKDConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
