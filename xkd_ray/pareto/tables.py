"""The registry's tables and summary: their schemas, validated reads, and the front as the
non-dominated set of the recorded trials (see xkd_ray.pareto.front for the layout and the readers'
guarantees). Every read is bounded: a table is at most ``MAX_TABLE_BYTES`` and ``MAX_TABLE_ROWS``,
is never read through a symbolic link, and each metric value must lie in its registry range."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from xkd_ray.config.search_settings import parse_constraint
from xkd_ray.core.checkpoints import MAX_TABLE_BYTES, atomic_write, read_json_mapping, read_regular_file
from xkd_ray.core.metrics import METRICS, non_dominated
from xkd_ray.errors import XKDCheckpointError
from xkd_ray.pareto.snapshot import registry_snapshot
from xkd_ray.pareto.storage import is_remote


@dataclass(frozen=True)
class Objectives:
    """What a search optimises, as the registry needs it: metric names with their directions,
    the hypervolume's reference point, and the constraints a front member must satisfy. Stored
    in summary.json, so readers (``xkd pareto``, ``load_pareto_student``) need no space file."""

    names: tuple[str, ...] = ("accuracy", "fidelity")
    directions: tuple[str, ...] = ("max", "max")
    reference_point: tuple[float, ...] = (0.0, 0.0)
    constraints: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: Any) -> Objectives:
        """From a space's ``SearchSettings``."""
        pairs = settings.objective_pairs()
        return cls(
            names=tuple(name for name, _ in pairs),
            directions=tuple(direction for _, direction in pairs),
            reference_point=tuple(settings.reference_point()),
            constraints=tuple(settings.constraints),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "directions": list(self.directions),
            "reference_point": list(self.reference_point),
            "constraints": list(self.constraints),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: Path) -> Objectives:
        try:
            objectives = cls(**{key: tuple(value) for key, value in raw.items()})
        except TypeError as exc:
            raise XKDCheckpointError(f"{where}: 'objectives' is not valid ({exc})") from None
        if not (len(objectives.names) == len(objectives.directions) == len(objectives.reference_point) >= 2):
            raise XKDCheckpointError(f"{where}: 'objectives' has mismatched names, directions and reference point")
        return objectives

    def point(self, row: dict[str, Any], split: str = "val") -> tuple[float, ...]:
        return tuple(row[f"{split}_{name}"] for name in self.names)

    def feasible(self, row: dict[str, Any]) -> bool:
        metrics = {name: row.get(f"val_{name}") for name in METRICS}
        return all(parse_constraint(text).violation(metrics) <= 0 for text in self.constraints)


def trial_columns() -> dict[str, pa.DataType]:
    """trials.parquet's schema: the trial's identity, then one column per registered metric
    (read when a table is written, so entries a plugin registers later are columns too)."""
    return {
        "trial_id": pa.string(),
        "method": pa.string(),
        "status": pa.string(),  # ok | stopped (early, by the scheduler) | errored | diverged
        "config": pa.string(),  # the trial's full experiment config, JSON
        "student_dir": pa.string(),
        "error": pa.string(),
        "resumed_from_checkpoint": pa.int64(),
        "nodes": pa.string(),  # JSON {"driver": node id, "workers": [node ids of every attempt]}
        "epochs_trained": pa.int64(),
        "feasible": pa.bool_(),  # satisfies search.constraints (never on the front otherwise)
        "reference": pa.bool_(),  # the space's reference configuration
        "finished_at": pa.float64(),  # Unix time the trial was recorded (hypervolume-over-time curves)
        **{f"val_{name}": pa.float64() for name in METRICS},
    }


def _split_metrics() -> list[tuple[str, str]]:
    return [(split, name) for split in ("val", "test") for name in METRICS]


def front_columns() -> dict[str, pa.DataType]:
    """front.parquet's schema: where each student is, and its val and test metrics."""
    columns = {"trial_id": pa.string(), "method": pa.string(), "path": pa.string()}
    return {**columns, **{f"{split}_{name}": pa.float64() for split, name in _split_metrics()}}


def _atomic_write_table(path: Path, rows: list[dict[str, Any]], columns: dict[str, pa.DataType]) -> None:
    table = pa.Table.from_pylist(rows, schema=pa.schema(list(columns.items())))
    atomic_write(path, lambda temporary: pq.write_table(table, temporary))


MAX_TABLE_ROWS = 20_000  # trials of a search (or front students); a crafted table must not hang a reader


def read_table(path: Path, columns: dict[str, pa.DataType]) -> pa.Table:
    """A registry table, read from one snapshot of its bytes; any problem (truncated, not
    Parquet, a missing or mistyped column) is an ``XKDCheckpointError`` naming the file."""
    payload = read_regular_file(path, MAX_TABLE_BYTES)
    try:
        metadata = pq.read_metadata(pa.BufferReader(payload))
        if metadata.num_rows > MAX_TABLE_ROWS:
            raise XKDCheckpointError(
                f"{path}: {metadata.num_rows} rows, more than the {MAX_TABLE_ROWS} a reader accepts"
            )
        table = pq.read_table(pa.BufferReader(payload))
    except (pa.ArrowException, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise XKDCheckpointError(f"{path}: not a readable Parquet table ({reason[:200]})") from None
    for name, kind in columns.items():
        if name not in table.column_names:
            raise XKDCheckpointError(f"{path}: column {name!r} is missing")
        if not table.schema.field(name).type.equals(kind):
            raise XKDCheckpointError(f"{path}: column {name!r} has type {table.schema.field(name).type}, not {kind}")
    return table


def read_trials(experiment: str | Path) -> list[dict[str, Any]]:
    path = Path(experiment) / "trials.parquet"
    return read_table(path, _core_columns(trial_columns())).to_pylist() if path.exists() else []


def _core_columns(columns: dict[str, pa.DataType]) -> dict[str, pa.DataType]:
    """The columns every reader needs: a trial's identity (metric columns are checked where an
    objective needs them, so a metric a plugin adds later never makes an older file unreadable)."""
    needed = {"trial_id", "method", "path", "status", "student_dir"}
    return {name: kind for name, kind in columns.items() if name in needed}


def read_objectives(experiment: str | Path) -> Objectives:
    """The objectives the experiment's search used (the default pair before its first trial)."""
    recorded = summary(experiment)
    if recorded is None or "objectives" not in recorded:
        return Objectives()
    return Objectives.from_dict(recorded["objectives"], Path(experiment) / "summary.json")


def record_trial(experiment: str | Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Add (or replace, on a retried trial) one finished trial's row; returns all rows."""
    rows = [r for r in read_trials(experiment) if r["trial_id"] != row["trial_id"]]
    columns = trial_columns()
    clean = {column: row.get(column) for column in columns}
    if not isinstance(clean["config"], str):
        clean["config"] = json.dumps(clean["config"], sort_keys=True, default=str)
    rows.append(clean)
    _atomic_write_table(Path(experiment) / "trials.parquet", rows, columns)
    return rows


def check_metric_values(rows: list[dict[str, Any]], table: Path, required: tuple[str, ...] = ()) -> None:
    """Every ``<split>_<metric>`` value of ``rows`` is null (not measured; never for a ``required``
    objective) or a finite number inside the metric's registry ``bounds``: a tampered front with
    accuracy 1e308, fidelity 5 or a NaN is refused, not ranked."""
    tolerance = 1e-6  # a Pearson r computed in float32 may exceed 1 by rounding
    for row in rows:
        for column, value in row.items():
            split, _, name = column.partition("_")
            if split not in ("val", "test") or name not in METRICS:
                continue
            where = f"{table}: trial {row.get('trial_id')!r} has {column}={value}"
            if value is None:
                if split == "val" and name in required:
                    raise XKDCheckpointError(f"{where}, not a finite number")
                continue
            low, high = METRICS[name].bounds
            if not math.isfinite(value):
                raise XKDCheckpointError(f"{where}, not a finite number")
            if not low - tolerance <= value <= high + tolerance:
                raise XKDCheckpointError(f"{where}, outside the metric's range [{low}, {high}]")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def front_rows(rows: list[dict[str, Any]], objectives: Objectives | None = None) -> list[dict[str, Any]]:
    """The non-dominated trials among those that finished ok and satisfy the constraints
    (stopped, errored, diverged and infeasible trials never enter the front)."""
    objectives = objectives or Objectives()
    candidates = [
        r
        for r in rows
        if r["status"] == "ok"
        and all(_finite(r.get(f"val_{name}")) for name in objectives.names)
        and objectives.feasible(r)
    ]
    points = [objectives.point(r) for r in candidates]
    return [candidates[i] for i in non_dominated(points, objectives.directions)]


def readable(experiment: str | Path) -> Path:
    """The experiment folder to read: itself, or a fresh local copy of an ``s3://`` experiment's front."""
    return registry_snapshot(experiment) if isinstance(experiment, str) and is_remote(experiment) else Path(experiment)


def summary(experiment: str | Path) -> dict[str, Any] | None:
    """``summary.json`` of an experiment (None before the first trial finished)."""
    path = readable(experiment) / "summary.json"
    if not path.exists():
        return None
    payload = read_json_mapping(path)
    for key, kind in (("trials", int), ("hypervolume", float | int)):
        if not isinstance(payload.get(key), kind) or isinstance(payload.get(key), bool):
            raise XKDCheckpointError(f"{path}: {key!r} is missing or not a number")
    if "objectives" in payload and not isinstance(payload["objectives"], dict):
        raise XKDCheckpointError(f"{path}: 'objectives' is not a mapping")
    return payload
