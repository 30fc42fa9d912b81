"""The on-disk Pareto registry: every finished trial, and the non-dominated students, loadable
without Ray.

Layout of an experiment folder::

    trials.parquet          one row per finished trial (ok / stopped / errored / diverged), val
                            metrics, epochs trained, feasibility, how often its training resumed
    students/<trial_id>/    every ok trial's student (model.pt, config.json, metrics.json)
    pareto/<trial_id>/      the non-dominated students, with test metrics added
    pareto/front.parquet    the front as a table
    summary.json            trials by status, front size, the objectives, hypervolume, and how the
                            front compares with the space's reference configuration

Every file is written to a temporary name and renamed, so a reader (or a crash) never sees a
half-written student; the front is recomputed from ``trials.parquet`` on each update, so it
always equals the non-dominated set of the finished, feasible trials under the search's
objectives (``Objectives``, any number, each maximised or minimised).

Readers may run while a search writes (another process, another machine on a shared folder):
a table is read from one ``read_bytes`` (a rename never changes an open file's content, while
``pq.read_table(path)`` reopens the file for each part); a student that leaves the front is
renamed away before it is deleted, so a reader sees it whole or not at all; and a reader whose
chosen student vanished re-reads the front, a bounded number of times, only when the front file
changed meanwhile. We chose the bounded retry over versioned folders behind a pointer file: the
writer stays one rename per file, and a real problem (the front unchanged) still fails at once.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from torch import nn

from xkd_ray.config.space import parse_constraint
from xkd_ray.core.checkpoints import (
    atomic_write,
    atomic_write_json,
    load_student,
    read_json_mapping,
    write_model_folder,
)
from xkd_ray.core.metrics import METRICS, dominates, hypervolume, non_dominated
from xkd_ray.errors import XKDCheckpointError
from xkd_ray.pareto.storage import is_remote, registry_snapshot
from xkd_ray.student.card import folder_files
from xkd_ray.student.predict import Student, load_student_folder
from xkd_ray.student.preprocessing import read_preprocessing


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


def read_table(path: Path, columns: dict[str, pa.DataType]) -> pa.Table:
    """A registry table, read from one snapshot of its bytes; any problem (truncated, not
    Parquet, a missing or mistyped column) is an ``XKDCheckpointError`` naming the file."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise XKDCheckpointError(f"{path}: file not found") from None
    try:
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


TestEvaluator = Callable[[nn.Module, dict[str, Any]], dict[str, float]]


def update_registry(
    experiment: str | Path, evaluate_test: TestEvaluator, objectives: Objectives | None = None
) -> dict[str, Any]:
    """Bring ``pareto/`` in line with ``trials.parquet``: add new front members (evaluated once
    on the test split), drop students that left the front, rewrite the front table and summary."""
    experiment = Path(experiment)
    objectives = objectives or Objectives()
    rows = read_trials(experiment)
    front = front_rows(rows, objectives)
    pareto_dir = experiment / "pareto"
    pareto_dir.mkdir(parents=True, exist_ok=True)
    table_rows = []
    for row in front:
        folder = pareto_dir / row["trial_id"]
        if not (folder / "metrics.json").exists():
            student, record, metrics = load_student(row["student_dir"])
            metrics = {**metrics, "test": evaluate_test(student, record)}
            origin = {"experiment": str(experiment), "trial_id": row["trial_id"], "objectives": list(objectives.names)}
            files = folder_files(record, metrics, read_preprocessing(row["student_dir"]), origin)
            write_model_folder(folder, student, record, metrics, files=files)
        metrics = read_json_mapping(folder / "metrics.json")
        table_rows.append(
            {
                "trial_id": row["trial_id"],
                "method": row["method"],
                "path": str(folder.relative_to(experiment)),
                **{f"{split}_{name}": metrics.get(split, {}).get(name) for split, name in _split_metrics()},
            }
        )
    first, sign = objectives.names[0], -1 if objectives.directions[0] == "max" else 1
    table_rows.sort(key=lambda r: sign * r[f"val_{first}"])
    _atomic_write_table(pareto_dir / "front.parquet", table_rows, front_columns())
    keep = {r["trial_id"] for r in front}
    for child in pareto_dir.iterdir():
        if child.is_dir() and not child.name.startswith(".") and child.name not in keep:
            retired = child.with_name(f".{child.name}.retired-{os.getpid()}")
            os.replace(child, retired)  # gone in one step for a reader, then deleted at leisure
            shutil.rmtree(retired, ignore_errors=True)
    front_points = [objectives.point(r) for r in front]
    hypervolume_of_front = hypervolume(front_points, objectives.reference_point, objectives.directions)
    summary = {
        "trials": len(rows),
        **{f"trials_{status}": sum(r["status"] == status for r in rows) for status in STATUSES},
        "trials_infeasible": sum(r["status"] == "ok" and r.get("feasible") is False for r in rows),
        "front_size": len(front),
        "hypervolume": hypervolume_of_front,
        "objectives": objectives.to_dict(),
        **{
            f"best_{name}": (max if direction == "max" else min)((r[f"val_{name}"] for r in front), default=None)
            for name, direction in zip(objectives.names, objectives.directions, strict=True)
        },
        "reference_config": _reference_summary(rows, front, objectives, hypervolume_of_front),
    }
    atomic_write_json(experiment / "summary.json", summary)
    return summary


STATUSES = ("ok", "stopped", "errored", "diverged")


def _reference_summary(
    rows: list[dict[str, Any]], front: list[dict[str, Any]], objectives: Objectives, front_hypervolume: float
) -> dict[str, Any] | None:
    """How the front compares with the space's reference configuration (evaluated first): does
    some front student dominate it, and how much more hypervolume does the front cover than the
    reference point alone (``hv_vs_reference`` > 1: the search found better students)."""
    reference = next((r for r in rows if r.get("reference") and r["status"] == "ok"), None)
    if reference is None:
        return None
    point = objectives.point(reference)
    alone = hypervolume([point], objectives.reference_point, objectives.directions)
    dominated = any(dominates(objectives.point(r), point, objectives.directions) for r in front)
    return {
        "trial_id": reference["trial_id"],
        "values": dict(zip(objectives.names, point, strict=True)),
        "dominated_by_front": dominated,
        "hypervolume": alone,
        "hv_vs_reference": front_hypervolume / alone if alone > 0 else None,
    }


def readable(experiment: str | Path) -> Path:
    """The experiment folder to read: itself, or a fresh local copy of an ``s3://`` experiment's front."""
    return registry_snapshot(experiment) if isinstance(experiment, str) and is_remote(experiment) else Path(experiment)


def list_pareto_students(experiment: str | Path) -> pa.Table:
    """The current front as an Arrow table (``.to_pandas()`` for a DataFrame); each row checked:
    its ``path`` stays inside the experiment folder and its objectives are finite numbers.
    ``experiment``: a folder or ``s3://bucket/prefix``."""
    experiment = readable(experiment)
    path = experiment / "pareto" / "front.parquet"
    if not path.exists():
        raise XKDCheckpointError(f"{path}: no Pareto front yet (has any trial finished?)")
    objectives = read_objectives(experiment)
    needed = {f"val_{name}": pa.float64() for name in objectives.names}
    table = read_table(path, {**_core_columns(front_columns()), **needed})
    for row in table.select(["trial_id", "path", *needed]).to_pylist():
        student_folder(experiment, row["path"], path)
        for name in objectives.names:
            value = row[f"val_{name}"]
            if value is None or not math.isfinite(value):
                raise XKDCheckpointError(
                    f"{path}: trial {row['trial_id']!r} has val_{name}={value}, not a finite number"
                )
    return table


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


def student_folder(experiment: Path, relative: str | None, table: Path) -> Path:
    """Where a front row's student lives; a path that is absolute or leaves the experiment
    folder is refused, so a crafted front.parquet cannot make us load a model from elsewhere."""
    if not relative or Path(relative).is_absolute():
        raise XKDCheckpointError(f"{table}: student path {relative!r} is not relative to the experiment folder")
    root = experiment.resolve()
    folder = (root / relative).resolve()
    if not folder.is_relative_to(root):
        raise XKDCheckpointError(f"{table}: student path {relative!r} points outside {experiment}")
    return experiment / relative


class ParetoStudent(Student):
    """A student from the front, ready to use: ``predict(x)`` / ``explain(x)`` on raw images,
    ``model(x)`` on standardised tensors (``xkd_ray.student.predict.Student``)."""


def _choose(rows: list[dict[str, Any]], prefer: str | dict[str, float], objectives: Objectives) -> dict[str, Any]:
    """One front row by preference. Values are signed so that larger is better in every
    objective (a minimised one is negated) before any comparison."""
    names = objectives.names
    signs = [1.0 if d == "max" else -1.0 for d in objectives.directions]
    points = [tuple(s * v for s, v in zip(signs, objectives.point(r), strict=True)) for r in rows]
    if isinstance(prefer, dict):
        unknown = set(prefer) - set(names)
        if unknown:
            raise ValueError(f"prefer: unknown objective {sorted(unknown)[0]!r}; use {' and/or '.join(names)}")
        weights = [float(prefer.get(name, 0.0)) for name in names]
        scores = [sum(w * v for w, v in zip(weights, p, strict=True)) for p in points]
        return rows[max(range(len(rows)), key=scores.__getitem__)]
    if prefer in names:
        # The best in that objective; ties go to the better of the others, in the objectives' order.
        first = names.index(prefer)
        return rows[max(range(len(rows)), key=lambda i: (points[i][first], *points[i]))]
    if prefer == "knee":
        # Closest to the utopia point after scaling each objective to [0, 1] over the front.
        dims = range(len(names))
        lows = [min(p[k] for p in points) for k in dims]
        spans = [max(p[k] for p in points) - lows[k] or 1.0 for k in dims]
        distance = [sum((1 - (p[k] - lows[k]) / spans[k]) ** 2 for k in dims) for p in points]
        return rows[min(range(len(rows)), key=distance.__getitem__)]
    raise ValueError(f"prefer: got {prefer!r}; use 'knee', {', '.join(map(repr, names))} or a weights dict")


READ_ATTEMPTS = 20  # a writer changes the front at most once per finished trial (seconds apart)


def load_pareto_student(experiment: str | Path, prefer: str | dict[str, float] = "knee") -> ParetoStudent:
    """Load one student of an experiment's front (a folder or ``s3://bucket/prefix``); needs no
    Ray and no running cluster. Safe while a search is updating the front (see the module docstring)."""
    experiment = readable(experiment)
    front_file = experiment / "pareto" / "front.parquet"
    for attempt in range(READ_ATTEMPTS):
        before = _file_version(front_file)
        rows = list_pareto_students(experiment).to_pylist()
        if not rows:
            raise XKDCheckpointError(f"{experiment}: the Pareto front is empty")
        chosen = _choose(rows, prefer, read_objectives(experiment))
        folder = student_folder(experiment, chosen["path"], front_file)
        try:
            model, config, metrics = load_student(folder)
            preprocessing = read_preprocessing(folder)
        except XKDCheckpointError:
            if attempt + 1 == READ_ATTEMPTS or _file_version(front_file) == before:
                raise  # the front did not move: the student is really missing or broken
            time.sleep(0.01 * (attempt + 1))
            continue
        return ParetoStudent(model=model, metrics=metrics, config=config, path=folder, preprocessing=preprocessing)
    raise AssertionError("unreachable")


def open_student(target: str | Path, prefer: str | dict[str, float] = "knee") -> Student:
    """A student folder (it holds model.pt), or an experiment (folder or ``s3://``) whose front
    member ``prefer`` picks; refused without ``preprocessing.json`` (one line: how to re-save)."""
    if not (isinstance(target, str) and is_remote(target)) and (Path(target) / "model.pt").exists():
        return load_student_folder(target)
    student = load_pareto_student(target, prefer)
    student.prep  # noqa: B018 (refuses an old folder here, before any work)
    return student


def _file_version(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def write_front_plot(experiment: str | Path, path: str | Path) -> Path:
    """One panel per pair of objectives: every ok trial as a dot coloured by method, the front
    members ringed, the reference configuration as a star, students whose explanation skill is
    <= 0 crossed, and the constant map's fidelity as a line where fidelity is an axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = read_objectives(experiment)
    rows = [r for r in read_trials(experiment) if r["status"] == "ok"]
    front = front_rows(rows, objectives)
    pairs = list(itertools.combinations(objectives.names, 2))
    figure, panels = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.5), squeeze=False)
    for axes, (x, y) in zip(panels[0], pairs, strict=True):
        for method in sorted({r["method"] or "?" for r in rows}):
            points = [r for r in rows if (r["method"] or "?") == method]
            axes.scatter([r[f"val_{x}"] for r in points], [r[f"val_{y}"] for r in points], label=method, alpha=0.7)
        if front:
            axes.scatter(
                [r[f"val_{x}"] for r in front], [r[f"val_{y}"] for r in front],
                facecolors="none", edgecolors="black", s=140, label="Pareto front",
            )  # fmt: skip
        unskilled = [r for r in rows if (r.get("val_fidelity_skill") or 0.0) <= 0]
        if unskilled:
            axes.scatter(
                [r[f"val_{x}"] for r in unskilled], [r[f"val_{y}"] for r in unskilled],
                marker="x", color="red", s=60, label="skill <= 0 (no better than the constant map)",
            )  # fmt: skip
        reference = [r for r in rows if r.get("reference")]
        if reference:
            axes.scatter(
                [r[f"val_{x}"] for r in reference], [r[f"val_{y}"] for r in reference],
                marker="*", color="gold", edgecolors="black", s=260, label="reference config", zorder=5,
            )  # fmt: skip
        template = rows[0].get("val_fidelity_template") if rows else None
        if template is not None and y == "fidelity":
            axes.axhline(template, color="grey", linewidth=0.8, label="template map (bar to beat)")
        axes.set_xlabel(f"validation {x} ({objectives.directions[objectives.names.index(x)]})")
        axes.set_ylabel(f"validation {y} ({objectives.directions[objectives.names.index(y)]})")
        axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)
    return Path(path)
