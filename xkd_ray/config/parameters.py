"""One searched key of a space file: its kind and range (``{uniform: [lo, hi]}``, ``{int: ...}``,
``{choice: [...]}``, or a plain fixed value), parsed with one error line naming the key, and the
probe values ``xkd_ray.config.space`` checks every trial's config with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from xkd_ray.errors import XKDConfigError

KINDS = ("uniform", "loguniform", "int", "choice")
ENUMERATED_INT_VALUES = 16  # int ranges up to this many values are checked value by value


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


def parse_parameter(name: str, raw: Any) -> Parameter:
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
