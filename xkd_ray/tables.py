"""Every table the user sees (terminal output of ``xkd``): columns come from the registries."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from xkd_ray.metrics import METRICS


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


NO_SKILL = " *"
NO_SKILL_CAPTION = "* skill <= 0: no better than showing the mean teacher map for every image"


def metric_cell(name: str, value: Any) -> str:
    """A metric's cell; a skill at or below 0 is marked: that explanation is no better than
    showing the mean teacher map for every image."""
    marked = name.endswith("_skill") and isinstance(value, float) and value <= 0
    return _cell(value) + (NO_SKILL if marked else "")


def _with_legend(table: Table) -> Table:
    """Say what the skill mark means, on tables that use it."""
    if any(str(cell).endswith(NO_SKILL) for column in table.columns for cell in column.cells):
        table.caption = NO_SKILL_CAPTION
    return table


def items_table(title: str, items: dict[str, Any]) -> Table:
    """Two columns, item and value (the teacher's summary)."""
    table = Table(title=title)
    table.add_column("item")
    table.add_column("value")
    for key, value in items.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def metrics_table(title: str, runs: dict[str, dict[str, Any]], split: str = "test") -> Table:
    """One row per registered metric, one column per run: the side-by-side view users compare
    methods in (metrics as rows, so a growing registry never squeezes the columns)."""
    table = Table(title=title)
    table.add_column("metric")
    for run in runs:
        table.add_column(run, justify="right")
    for name in METRICS:
        table.add_row(name, *(metric_cell(name, metrics.get(split, {}).get(name)) for metrics in runs.values()))
    return _with_legend(table)


def front_table(rows: list[dict[str, Any]], title: str, objectives: tuple[str, ...]) -> Table:
    """The Pareto front: each student's objectives on val (searched on) and test (reported)."""
    shown = (*objectives, *(name for name in ("fidelity_skill",) if name not in objectives))
    columns = ["trial_id", "method", *(f"{split}_{name}" for split in ("val", "test") for name in shown)]
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(metric_cell(column, row.get(column)) for column in columns))
    return _with_legend(table)


def live_trials_table(
    title: str, latest: dict[str, dict[str, Any]], front: set[str], objectives: tuple[str, ...]
) -> Table:
    """A search in progress: each trial's last report, a star on the current front."""
    table = Table(title=title)
    for column in ("trial", "status", "epoch", *objectives, "front"):
        table.add_column(column)
    for trial_id, result in sorted(latest.items()):
        table.add_row(
            trial_id,
            str(result.get("status", "running")),
            str(result.get("epoch", "")),
            *(_cell(float(result.get(name, math.nan))) for name in objectives),
            "*" if trial_id in front else "",
        )
    return table
