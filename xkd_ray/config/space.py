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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from xkd_ray.config.parameters import KINDS, Parameter, parse_parameter  # noqa: F401 (imported from here)
from xkd_ray.config.schema import ExperimentConfig, config_error
from xkd_ray.config.search_settings import (  # noqa: F401 (the names callers import from here)
    SAMPLERS,
    SCHEDULERS,
    Constraint,
    Objective,
    SchedulerSettings,
    SearchSettings,
)
from xkd_ray.config.yaml_loader import read_yaml
from xkd_ray.errors import XKDConfigError

CLI_SECTIONS = ("student", "distill")  # what `xkd distill` takes from its defaults; the rest from base
# Sections prepared once from the base for the whole search (data, teacher, explanations) or set by
# the search's worker settings: a sampled value there would be recorded but never trained with.
PREPARED_ONCE = ("data", "teacher", "explain", "ray")
MAX_COMBINATIONS = 4096  # probe combinations checked together (~20 us each)


@dataclass
class SearchSpec:
    base: ExperimentConfig
    parameters: dict[str, Parameter]
    search: SearchSettings = field(default_factory=SearchSettings)

    def fixed_overrides(self) -> dict[str, Any]:
        return {name: p.value for name, p in self.parameters.items() if p.kind == "fixed"}

    def searched(self) -> list[str]:
        return [name for name, p in self.parameters.items() if p.kind != "fixed"]

    def cli_config(self, given: dict[str, Any]) -> ExperimentConfig:
        """What ``xkd distill`` trains with its CLI defaults, plus ``given`` (e.g. the method): every
        ``student.*`` and ``distill.*`` key at the config default (epochs included), on the data,
        teacher and explainer every trial of this search uses."""
        defaults = ExperimentConfig().to_dict()
        cli = {f"{section}.{key}": value for section in CLI_SECTIONS for key, value in defaults[section].items()}
        return self.trial_config({}).with_overrides({**cli, **given})

    def cli_point(self, given: dict[str, Any]) -> dict[str, Any]:
        """``cli_config(given)`` as a point of the space: its value of every searched key."""
        config = self.cli_config(given).to_dict()
        return {name: config[name.partition(".")[0]][name.partition(".")[2]] for name in self.searched()}

    def cli_points(self) -> list[dict[str, Any]]:
        """The reference, then each ``search.cli_defaults`` method, as points to evaluate first."""
        return [self.cli_point(given) for given in self.search.cli_point_givens()]

    def reference_point(self) -> dict[str, Any] | None:
        """``search.reference`` as a point: the given keys, and the CLI's default for every other
        searched key (the configuration a user gets without searching)."""
        return None if self.search.reference is None else self.cli_point(self.search.reference)

    def cli_given(self, sampled: dict[str, Any]) -> dict[str, Any] | None:
        """Which CLI-default point ``sampled`` is (what it sets over the CLI's defaults), or None."""
        for given in self.search.cli_point_givens():
            point = self.cli_point(given)
            if all(sampled.get(name) == value for name, value in point.items()):
                return given
        return None

    def is_cli_point(self, sampled: dict[str, Any]) -> bool:
        return self.cli_given(sampled) is not None

    def is_reference(self, sampled: dict[str, Any]) -> bool:
        given = self.cli_given(sampled)
        return given is not None and given == self.search.reference

    def config_for(self, sampled: dict[str, Any]) -> ExperimentConfig:
        """The config a trial trains with: a CLI-default point (the reference, ``cli_defaults``)
        trains exactly as ``xkd distill`` would, every other point as ``trial_config``."""
        given = self.cli_given(sampled)
        return self.trial_config(sampled) if given is None else self.cli_config(given)

    def cli_differences(self) -> list[str]:
        """The keys where the CLI-default trials train differently from the sampled ones (the base
        or a fixed space value changes a training budget the CLI keeps at its default)."""
        cli, trials = self.cli_config({}).to_dict(), self.trial_config({}).to_dict()
        searched = set(self.searched())
        return [
            f"{section}.{key}: {cli[section][key]!r} (other trials: {trials[section][key]!r})"
            for section in CLI_SECTIONS
            for key in cli[section]
            if cli[section][key] != trials[section][key] and f"{section}.{key}" not in searched
        ]

    def trial_config(self, sampled: dict[str, Any]) -> ExperimentConfig:
        """The full config of one trial: base, the search's worker settings, the space's fixed
        values, then the sampled values, validated once as a whole."""
        workers = {"ray.num_workers": self.search.workers_per_trial, "ray.cpus_per_worker": self.search.cpus_per_worker}
        return self.base.with_overrides({**workers, **self.fixed_overrides(), **sampled})


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
        why = {
            "ray": "resources come from one place: search.workers_per_trial, search.cpus_per_worker and base.ray",
        }.get(section, "the data, teacher and explanations are prepared once, from base, for every trial")
        if section in PREPARED_ONCE and spec.parameters[name].kind != "fixed":
            raise XKDConfigError(f"space.{name}: cannot be sampled ({why}); set it in base")
        if name in ("ray.num_workers", "ray.cpus_per_worker"):
            raise XKDConfigError(f"space.{name}: cannot be set here ({why})")
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


def _cli_points(spec: SearchSpec) -> list[tuple[str, dict[str, Any]]]:
    """The reference and ``search.cli_defaults`` as named points; what they set must be searched."""
    searched = spec.searched()
    givens: list[tuple[str, dict[str, Any]]] = []
    if spec.search.reference is not None:
        givens.append(("search.reference", spec.search.reference))
    for index, method in enumerate(spec.search.cli_defaults):
        if {"distill.method": method} != spec.search.reference:  # the reference is that point already
            givens.append((f"search.cli_defaults[{index}]", {"distill.method": method}))
    points = []
    for where, given in givens:
        for name in given:
            if name not in searched:
                raise XKDConfigError(f"{where}.{name}: not a searched key; searched keys are {', '.join(searched)}")
        try:
            spec.cli_config(given)
        except XKDConfigError as exc:
            raise XKDConfigError(f"{where}: not a valid configuration ({exc})") from None
        points.append((where, spec.cli_point(given)))
    return points


def _check_initial_points(spec: SearchSpec) -> None:
    """Each point may only name searched keys, with a value its range or choice list allows; the
    keys it leaves out are filled by the sampler, tried here at their first and last probes. The
    CLI-default points (reference, ``cli_defaults``) hold the CLI's default for every searched key
    they do not set: a range that excludes it is refused (the point could not be proposed)."""
    searched = {name: p.probes() for name, p in spec.parameters.items() if p.kind != "fixed"}
    initial = [(f"search.initial_points[{i}]", point) for i, point in enumerate(spec.search.initial_points)]
    cli = _cli_points(spec)
    for where, point in [*cli, *initial]:
        hint = " (xkd distill's default; widen the range)" if (where, point) in cli else ""
        for name, value in point.items():
            parameter = spec.parameters.get(name)
            if parameter is None or parameter.kind == "fixed":
                raise XKDConfigError(f"{where}.{name}: not a searched key; searched keys are {', '.join(searched)}")
            if parameter.kind == "choice":
                if value not in parameter.choices:
                    raise XKDConfigError(f"{where}.{name}: {value!r} is not one of {list(parameter.choices)}{hint}")
            elif not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and parameter.low <= value <= parameter.high
            ):
                raise XKDConfigError(f"{where}.{name}: {value!r} is outside [{parameter.low}, {parameter.high}]{hint}")
            if parameter.kind == "int" and not isinstance(value, int):
                raise XKDConfigError(f"{where}.{name}: {value!r} must be an integer")
        for end in (0, -1):
            try:
                spec.trial_config({**{name: values[end] for name, values in searched.items()}, **point})
            except XKDConfigError as exc:
                raise XKDConfigError(f"{where}: not a valid configuration ({exc})") from None
    if len({tuple(sorted(point.items())) for _, point in cli}) != len(cli):
        raise XKDConfigError("search.cli_defaults: two CLI-default points are the same configuration")


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
        parameters={str(name): parse_parameter(str(name), value) for name, value in space.items()},
        search=search,
    )
    _check_values(spec)
    _check_initial_points(spec)
    _check_measured_on_val(spec)
    scheduler = spec.search.scheduler
    epochs = spec.trial_config({}).distill.epochs
    if scheduler.name != "fifo" and scheduler.grace_epochs >= epochs:
        raise XKDConfigError(
            f"search.scheduler.grace_epochs: {scheduler.grace_epochs} leaves no epoch to stop early "
            f"(distill.epochs is {epochs})"
        )
    return spec


def _check_measured_on_val(spec: SearchSpec) -> None:
    """Objectives and constraints read a trial's val metrics: one the base does not measure there
    would be None for every trial, so Optuna could rank nothing. Refused here, not after hours."""
    faithfulness = spec.trial_config({}).faithfulness
    used = [(f"search.objectives[{i}]", o.metric) for i, o in enumerate(spec.search.objectives)]
    used += [(f"search.constraints[{i}]", c.metric) for i, c in enumerate(spec.search.parsed_constraints())]
    for where, metric in used:
        if (why := faithfulness.not_measured(metric, "val")) is not None:
            raise XKDConfigError(f"{where}: {metric} {why}; set it in base or choose another metric")


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
