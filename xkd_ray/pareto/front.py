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

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
from torch import nn

from xkd_ray.core.checkpoints import atomic_write_json, load_student, read_json_mapping, write_model_folder
from xkd_ray.core.metrics import dominates, hypervolume
from xkd_ray.errors import XKDCheckpointError
from xkd_ray.pareto.plot import write_front_plot
from xkd_ray.pareto.storage import is_remote
from xkd_ray.pareto.tables import (
    MAX_TABLE_ROWS,
    Objectives,
    _atomic_write_table,
    _core_columns,
    _split_metrics,
    check_metric_values,
    front_columns,
    front_rows,
    read_objectives,
    read_table,
    read_trials,
    readable,
    record_trial,
    summary,
    trial_columns,
)
from xkd_ray.student.card import folder_files
from xkd_ray.student.predict import Student, load_student_folder
from xkd_ray.student.preprocessing import read_preprocessing

__all__ = [  # the registry's public names, wherever they are defined
    "MAX_FRONT_ROWS", "MAX_TABLE_ROWS", "Objectives", "ParetoStudent", "front_columns", "front_rows",
    "list_pareto_students", "load_pareto_student", "read_objectives", "read_table", "read_trials", "readable",
    "record_trial", "student_folder", "summary", "trial_columns", "update_registry", "write_front_plot",
]  # fmt: skip


MAX_FRONT_ROWS = 2_000  # non-dominated students of one search; more means a crafted file


TestEvaluator = Callable[[nn.Module, dict[str, Any]], dict[str, float]]


def update_registry(
    experiment: str | Path, evaluate_test: TestEvaluator, objectives: Objectives | None = None
) -> dict[str, Any]:
    """Bring ``pareto/`` in line with ``trials.parquet``: add new front members (evaluated once
    on the test split unless the student folder has its test metrics), drop students that left
    the front, rewrite the front table and summary."""
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
            if "test" not in metrics:  # a search's trial evaluates its own test split
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
    if table.num_rows > MAX_FRONT_ROWS:
        raise XKDCheckpointError(f"{path}: {table.num_rows} students, more than the {MAX_FRONT_ROWS} a front can hold")
    rows = table.to_pylist()
    for row in rows:
        student_folder(experiment, row["path"], path)
    check_metric_values(rows, path, objectives.names)
    return table


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
