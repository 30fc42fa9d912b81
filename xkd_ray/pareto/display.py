"""Every table the user sees (terminal output of ``xkd``): columns come from the registries.

Every table stays readable on an 80-column terminal whatever the registries hold (plugins add
metrics, a search can have many objectives):

- a metric used as a column header gets a short name (``short_names``: derived from the registry
  name, unique by construction), and the table's caption maps each short name to the full one;
- a table whose natural width exceeds the console is drawn in its vertical layout instead, one
  row per trial (or run) and metric with the full metric names; the choice is made when the
  table is printed (``Fitted``), so a live table follows the terminal;
- cells fold instead of being cut with an ellipsis, so no name or value is ever lost, and text
  is never read as rich markup (``explanations[train]`` stays as written).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from xkd_ray.core.faithfulness_metrics import NOT_INFORMATIVE, curve_of, informative_in
from xkd_ray.core.metrics import METRICS


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


NO_SKILL = " *"
NO_SKILL_CAPTION = "* skill <= 0: no better than showing the mean teacher map for every image"
SPLITS = ("val", "test")
SHORT_PART = 3  # characters kept of each "_"-separated part of a metric name


def metric_cell(name: str, value: Any) -> str:
    """A metric's cell; a skill at or below 0 is marked: that explanation is no better than
    showing the mean teacher map for every image."""
    marked = name.endswith("_skill") and isinstance(value, float) and value <= 0
    return _cell(value) + (NO_SKILL if marked else "")


NOT_INFORMATIVE_CELL = "n/i"
NOT_INFORMATIVE_CAPTION = (
    f"{NOT_INFORMATIVE_CELL}: {NOT_INFORMATIVE}: on this split the teacher's own maps do not beat the same maps "
    "shifted elsewhere under this curve, so it cannot rank explanations (docs/FAITHFULNESS.md)"
)


def judged_cell(name: str, value: Any, metrics: dict[str, Any], prefix: str = "") -> str:
    """``metric_cell``, except a student's AUC under a perturbation curve that cannot tell the
    teacher's maps from random ones on this split (``faithfulness_metrics.informative``) shows
    "n/i" instead of a number to rank by (the teacher's own AUCs stay: they are the evidence)."""
    curve = curve_of(name)
    students = ("_head", "_posthoc", "_random", "_shifted")
    judged = curve is not None and name.endswith(students) and METRICS[name].error_of is None
    if judged and value is not None and informative_in(metrics, curve, prefix) is False:
        return NOT_INFORMATIVE_CELL
    return metric_cell(name, value)


def short_names(names: Iterable[str], reserved: Iterable[str] = (), length: int = SHORT_PART) -> dict[str, str]:
    """A unique short header per metric name: each ``_``-separated part cut to ``length``
    characters (``fidelity_posthoc_skill`` -> ``fid_pos_ski``, ``accuracy`` -> ``acc``).

    Names whose short forms coincide (with each other or with a ``reserved`` header of the same
    table) keep one more character of each part, round after round, until none do. A name cut at
    its longest part's length is the name itself and registry names are distinct, so this ends;
    only a metric named exactly like a reserved header is then told apart by a trailing ``'``.
    """
    names = list(dict.fromkeys(names))
    reserved = set(reserved)
    kept = dict.fromkeys(names, length)

    def cut(name: str) -> str:
        return "_".join(part[: kept[name]] for part in name.split("_"))

    while True:
        shorts = {name: cut(name) for name in names}
        holders: dict[str, list[str]] = defaultdict(list)
        for name, short in shorts.items():
            holders[short].append(name)
        clashing = [name for name, short in shorts.items() if len(holders[short]) > 1 or short in reserved]
        growing = [name for name in clashing if shorts[name] != name]
        if not growing:
            break
        for name in growing:
            kept[name] += 1
    used = set(shorts.values()) | reserved
    for name in clashing:  # only full names equal to a reserved header are left
        short = name
        while short in used:
            short += "'"
        shorts[name] = short
        used.add(short)
    return shorts


def legend(shorts: dict[str, str]) -> str:
    """``short=full`` for every shortened name: one unbreakable word each, so wrapping the
    caption never separates a short name from its meaning."""
    return "  ".join(f"{short}={name}" for name, short in shorts.items() if short != name)


def _caption(*parts: str) -> Text | None:
    text = "\n".join(part for part in parts if part)
    return Text(text, justify="left") if text else None


def _table(title: str, headers: Sequence[str], caption: Text | None = None, right: Iterable[str] = ()) -> Table:
    """A table whose title, headers and cells are plain text (no markup) and whose cells fold
    rather than being cut with an ellipsis."""
    table = Table(title=Text(title), caption=caption, caption_justify="left")
    right = set(right)
    for header in headers:
        table.add_column(Text(header), overflow="fold", justify="right" if header in right else "left")
    return table


def _row(table: Table, cells: Iterable[Any], end_section: bool = False) -> None:
    table.add_row(*(Text(str(cell)) for cell in cells), end_section=end_section)


class Fitted:
    """A table with two layouts: ``wide`` where the console has room for its natural width,
    else ``narrow`` (one row per item and metric, which fits any registry on 80 columns)."""

    def __init__(self, wide: Table, narrow: Table) -> None:
        self.wide = wide
        self.narrow = narrow

    def natural_width(self, console: Console, options: ConsoleOptions) -> int:
        """The wide layout's width with nothing wrapped (measured as if the console were huge)."""
        return Measurement.get(console, options.update_width(100_000), self.wide).maximum

    def choose(self, console: Console, options: ConsoleOptions) -> Table:
        return self.wide if self.natural_width(console, options) <= options.max_width else self.narrow

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Table]:
        yield self.choose(console, options)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.choose(console, options))


def items_table(title: str, items: dict[str, Any]) -> Table:
    """Two columns, item and value (the teacher's summary); long values (paths) fold."""
    table = _table(title, ("item", "value"))
    for key, value in items.items():
        _row(table, (key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    return table


def metrics_table(title: str, runs: dict[str, dict[str, Any]], split: str = "test") -> Fitted:
    """One row per registered metric, one column per run: the side-by-side view users compare
    methods in (metrics as rows, so a growing registry never squeezes the columns). With more
    runs than the console has room for: one row per metric and run."""
    cells = {
        name: [judged_cell(name, (m := metrics.get(split, {})).get(name), m) for metrics in runs.values()]
        for name in METRICS
    }
    marked = any(cell.endswith(NO_SKILL) for row in cells.values() for cell in row)
    judged = any(cell == NOT_INFORMATIVE_CELL for row in cells.values() for cell in row)
    caption = _caption(NO_SKILL_CAPTION if marked else "", NOT_INFORMATIVE_CAPTION if judged else "")
    wide = _table(title, ("metric", *runs), caption, right=runs)
    for name, row in cells.items():
        _row(wide, (name, *row))
    narrow = _table(title, ("metric", "run", "value"), caption, right=("value",))
    for name, row in cells.items():
        for index, (run, cell) in enumerate(zip(runs, row, strict=True)):
            _row(narrow, (name if index == 0 else "", run, cell), end_section=index == len(row) - 1)
    return Fitted(wide, narrow)


def front_table(rows: list[dict[str, Any]], title: str, objectives: Sequence[str]) -> Fitted:
    """The Pareto front: each student's objectives on val (searched on) and test (reported).

    Wide: one row per student, a column per metric and split headed by the metric's short name
    over the split (the caption maps short names to metrics). Narrow: one row per student and
    metric, full metric names, val and test side by side."""
    objectives = tuple(getattr(objectives, "names", objectives))
    shown = (*objectives, *(name for name in ("fidelity_skill",) if name not in objectives))
    values = [
        {
            (split, name): judged_cell(name, row.get(f"{split}_{name}"), row, f"{split}_")
            for split in SPLITS
            for name in shown
        }
        for row in rows
    ]
    marked = any(cell.endswith(NO_SKILL) for row in values for cell in row.values())
    judged = any(cell == NOT_INFORMATIVE_CELL for row in values for cell in row.values())
    skill_note = "\n".join(note for note, on in ((NO_SKILL_CAPTION, marked), (NOT_INFORMATIVE_CAPTION, judged)) if on)
    shorts = short_names(shown, reserved=("trial", "method"))
    keys = [(split, name) for split in SPLITS for name in shown]
    headers = [f"{shorts[name]}\n{split}" for split, name in keys]
    wide = _table(title, ("trial", "method", *headers), _caption(legend(shorts), skill_note), right=headers)
    for row, cells in zip(rows, values, strict=True):
        _row(wide, (_cell(row.get("trial_id")), _cell(row.get("method")), *(cells[key] for key in keys)))
    narrow = _table(title, ("trial", "method", "metric", *SPLITS), _caption(skill_note), right=SPLITS)
    for row, cells in zip(rows, values, strict=True):
        for index, name in enumerate(shown):
            first = index == 0
            identity = (_cell(row.get("trial_id")), _cell(row.get("method"))) if first else ("", "")
            _row(
                narrow,
                (*identity, name, *(cells[(split, name)] for split in SPLITS)),
                end_section=index == len(shown) - 1,
            )
    return Fitted(wide, narrow)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def trial_epochs(result: dict[str, Any], default: int | None = None) -> int | None:
    """A trial's ``distill.epochs``: from the full config its driver reports when it ends
    (``experiment_config``), from the config Tune puts in every result when the space samples
    it (``config["distill.epochs"]``), else ``default`` (the search's own value)."""
    experiment = result.get("experiment_config")
    if isinstance(experiment, dict) and isinstance(experiment.get("distill"), dict):
        total = _number(experiment["distill"].get("epochs"))
        if total is not None:
            return int(total)
    sampled = result.get("config")
    if isinstance(sampled, dict) and _number(sampled.get("distill.epochs")) is not None:
        return int(sampled["distill.epochs"])
    return default


def epoch_progress(result: dict[str, Any], epochs: int | None = None) -> str:
    """``3/12``: epochs finished out of the trial's total (just ``3`` when the total is unknown).

    Ray Train workers report ``epoch``, the 0-based index of the epoch they just finished
    (``ray_train.worker_loop``), and Tune passes it on inside its result; a trial driver's final
    report has no ``epoch`` but counts them (``epochs_trained``)."""
    epoch = _number(result.get("epoch"))
    done = int(epoch) + 1 if epoch is not None else _number(result.get("epochs_trained"))
    if done is None:
        return "-"
    total = trial_epochs(result, epochs)
    return f"{int(done)}/{total}" if total else str(int(done))


def _objective_cell(value: Any) -> str:
    """An objective as reported: NaN (a diverged trial) shows as nan, a missing one as -."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return _cell(float(value))


def trial_status(result: dict[str, Any]) -> str:
    """The driver reports ``status`` when a trial ends; a worker's report says ``diverged``."""
    if result.get("status") is not None:
        return str(result["status"])
    return "diverged" if result.get("diverged") is True else "running"


def live_trials_table(
    title: str,
    latest: dict[str, dict[str, Any]],
    front: set[str],
    objectives: Sequence[str],
    epochs: int | None = None,
) -> Fitted:
    """A search in progress: each trial's last report (``latest``: trial id -> Tune result),
    its epoch out of ``distill.epochs`` (``epochs``: the search's value, for trials whose
    result does not say), a star on the current front."""
    objectives = tuple(getattr(objectives, "names", objectives))
    fixed = ("trial", "status", "epoch")
    shorts = short_names(objectives, reserved=(*fixed, "front"))
    headers = [shorts[name] for name in objectives]
    rows = [
        (
            trial_id,
            trial_status(result),
            epoch_progress(result, epochs),
            [_objective_cell(result.get(name)) for name in objectives],
            "*" if trial_id in front else "",
        )
        for trial_id, result in sorted(latest.items())
    ]
    wide = _table(title, (*fixed, *headers, "front"), _caption(legend(shorts)), right=headers)
    for trial_id, status, epoch, cells, star in rows:
        _row(wide, (trial_id, status, epoch, *cells, star))
    narrow = _table(title, (*fixed, "front", "metric", "value"), right=("value",))
    for trial_id, status, epoch, cells, star in rows:
        for index, (name, cell) in enumerate(zip(objectives, cells, strict=True)):
            identity = (trial_id, status, epoch, star) if index == 0 else ("", "", "", "")
            _row(narrow, (*identity, name, cell), end_section=index == len(objectives) - 1)
    return Fitted(wide, narrow)
