"""The Pareto registry is safe to read while a search writes it, and refuses crafted or broken
files with one error naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from xkd_ray.core.checkpoints import atomic_write_bytes, load_student, write_model_folder
from xkd_ray.core.models import StudentNet
from xkd_ray.errors import XKDCheckpointError
from xkd_ray.pareto.front import list_pareto_students, load_pareto_student, record_trial, update_registry
from xkd_ray.ui.cli import main as xkd_main

ARCHITECTURE = {"in_channels": 1, "num_classes": 10, "width": 4, "ae_depth": 1, "ae_width": 4, "fusion": "concat"}

# A search-like writer: one finished trial after another, each a real student folder, the front
# recomputed each time. Accuracy rises while fidelity is random, so members keep leaving the front
# (their folders are deleted) and new ones join (front.parquet rewritten).
WRITER = textwrap.dedent(
    """
    import random, sys, torch
    from pathlib import Path
    from xkd_ray.core.checkpoints import write_model_folder
    from xkd_ray.core.models import StudentNet
    from xkd_ray.pareto.front import record_trial, update_registry
    experiment, stop = Path(sys.argv[1]), Path(sys.argv[2])
    architecture = {architecture!r}
    rng = random.Random(0)
    index = 0
    while not stop.exists():
        student = StudentNet.from_architecture(architecture)
        folder = experiment / "students" / f"t{{index:05d}}"
        metrics = {{"val": {{"accuracy": 0.5 + index / (2 * (index + 100)), "fidelity": rng.random()}}}}
        write_model_folder(folder, student, {{"architecture": architecture, "experiment": {{}}}}, metrics)
        row = {{"trial_id": f"t{{index:05d}}", "method": "xd", "status": "ok", "config": {{}},
               "student_dir": str(folder), **{{f"val_{{k}}": v for k, v in metrics["val"].items()}}}}
        record_trial(experiment, row)
        update_registry(experiment, lambda model, record: {{"accuracy": 0.9, "fidelity": 0.5}})
        if index == 0:
            print("first", flush=True)
        index += 1
    print(index, flush=True)
    """
).format(architecture=ARCHITECTURE)


@pytest.mark.slow  # a stress test: 45 s of concurrent reads
def test_readers_never_see_a_partial_registry_while_a_search_writes(tmp_path):
    """1,200 reads of the front (list + load a student), every one while a writer updates it (the
    writer runs until the reads are done): 0 errors. Before the registry was made reader-safe, 21
    of 3,397 reads raised pyarrow errors and loads met missing model.pt files (about 7 expected in
    1,200; 3,000 reads took 2 minutes of the suite)."""
    experiment, stop = tmp_path / "experiment", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(experiment), str(stop)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert writer.stdout.readline().strip() == "first"
    reads, errors = 0, []
    preferences = ["knee", "accuracy", "fidelity", {"accuracy": 1.0, "fidelity": 1.0}]
    try:
        while reads < 1200:
            assert writer.poll() is None, "the writer stopped before the reads were done"
            try:
                rows = list_pareto_students(experiment).to_pylist()
                assert rows, "an empty front after the first update"
                student = load_pareto_student(experiment, prefer=preferences[reads % len(preferences)])
                assert student.path.name in {row["trial_id"] for row in rows} | {student.path.name}
            except Exception as exc:  # every kind of failure counts
                errors.append(f"{type(exc).__name__}: {exc}")
            reads += 1
    finally:
        stop.touch()
        updates = writer.communicate(timeout=600)[0].split()[-1]
    assert writer.returncode == 0
    assert int(updates) >= 30, f"only {updates} registry updates happened during the reads"
    assert errors == [], f"{len(errors)} errors in {reads} reads, e.g. {errors[:3]}"


def _registry(tmp_path: Path) -> Path:
    experiment = tmp_path / "experiment"
    student = StudentNet.from_architecture(ARCHITECTURE)
    folder = write_model_folder(
        experiment / "students" / "a", student, {"architecture": ARCHITECTURE, "experiment": {}},
        {"val": {"accuracy": 0.9, "fidelity": 0.5}},
    )  # fmt: skip
    row = {"trial_id": "a", "method": "xd", "status": "ok", "config": {}, "student_dir": str(folder)}
    record_trial(experiment, {**row, "val_accuracy": 0.9, "val_fidelity": 0.5})
    update_registry(experiment, lambda model, record: {"accuracy": 0.8, "fidelity": 0.4})
    return experiment


def _rewrite_front(experiment: Path, **changes: object) -> None:
    path = experiment / "pareto" / "front.parquet"
    rows = [{**row, **changes} for row in pq.read_table(path).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)


@pytest.mark.parametrize("path", ["../OUTSIDE_student", "/tmp/OUTSIDE_student", "students/../../OUTSIDE_student"])
def test_front_paths_outside_the_experiment_are_refused(tmp_path, path):
    experiment = _registry(tmp_path)
    outside = tmp_path / "OUTSIDE_student"
    write_model_folder(outside, StudentNet.from_architecture(ARCHITECTURE), {"architecture": ARCHITECTURE}, {})
    _rewrite_front(experiment, path=path)
    with pytest.raises(XKDCheckpointError, match=r"front.parquet: student path .* (outside|not relative)"):
        load_pareto_student(experiment)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda e: (e / "pareto" / "front.parquet").write_bytes((e / "pareto" / "front.parquet").read_bytes()[:300]),
         "front.parquet: not a readable Parquet table"),
        (lambda e: pq.write_table(pa.table({"trial_id": ["a"]}), e / "pareto" / "front.parquet"),
         "front.parquet: column 'method' is missing"),
        (lambda e: pq.write_table(pa.table({"trial_id": [1], "method": ["xd"]}), e / "pareto" / "front.parquet"),
         "front.parquet: column 'trial_id' has type int64"),
        (lambda e: _rewrite_front(e, val_accuracy=float("nan")), "val_accuracy=nan, not a finite number"),
        (lambda e: (e / "summary.json").write_text("{not json"), "summary.json: not valid JSON"),
        (lambda e: (e / "summary.json").write_text('{"trials": 1}'), "summary.json: 'hypervolume' is missing"),
        (lambda e: (e / "pareto" / "a" / "config.json").write_text("[1, 2]"),
         "pareto/a/config.json: expected a JSON object"),
        (lambda e: (e / "pareto" / "a" / "metrics.json").write_text('{"val": {"accuracy": NaN}}'),
         "pareto/a/metrics.json: not valid JSON (non-finite number NaN"),
        (lambda e: (e / "trials.parquet").write_bytes(b"PAR1 garbage"), "trials.parquet: not a readable Parquet"),
    ],
)  # fmt: skip
def test_broken_registry_files_are_one_line_errors_naming_the_file(tmp_path, capsys, damage, expected):
    """Each reader: `xkd pareto` (front, summary, trials for the plot) and `load_pareto_student`."""
    experiment = _registry(tmp_path)
    damage(experiment)
    code = xkd_main(["pareto", str(experiment), "--plot", str(tmp_path / "front.png")])
    error = capsys.readouterr().err.strip()
    if "pareto/a/" in expected:  # a student's own files: read when the student is loaded
        assert code == 0
        with pytest.raises(XKDCheckpointError) as raised:
            load_pareto_student(experiment)
        error = str(raised.value)
    else:
        assert code == 2, error
    assert len(error.splitlines()) == 1 and expected in error, error


def test_non_finite_metrics_are_written_as_null_and_refused_when_read(tmp_path):
    student = StudentNet.from_architecture(ARCHITECTURE)
    folder = write_model_folder(tmp_path / "s", student, {"architecture": ARCHITECTURE}, {"skill": float("nan")})
    assert json.loads((folder / "metrics.json").read_text()) == {"skill": None}
    assert load_student(folder)[2] == {"skill": None}
    (folder / "metrics.json").write_text('{"skill": Infinity}')
    with pytest.raises(XKDCheckpointError, match=r"metrics\.json: not valid JSON"):
        load_student(folder)


CRASHING_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from xkd_ray.core.checkpoints import atomic_write
    def slow(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            handle.write(b"N" * 500_000)
            handle.flush()
            print("half", flush=True)
            time.sleep(60)
            handle.write(b"N" * 500_000)
    atomic_write(Path(sys.argv[1]), slow)
    """
)


def test_a_crash_in_the_middle_of_a_write_leaves_the_old_file(tmp_path):
    """SIGKILL while ``atomic_write`` is half-way through: readers see the old content, whole,
    before and after the crash; only a hidden temporary file is left behind."""
    target = tmp_path / "front.parquet"
    old = b"O" * 1_000_000
    atomic_write_bytes(target, old)
    writer = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(target)], stdout=subprocess.PIPE, cwd=REPO)
    assert writer.stdout.readline().strip() == b"half"
    assert target.read_bytes() == old
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    time.sleep(0.1)
    assert target.read_bytes() == old
    assert next(p.name for p in tmp_path.iterdir() if p.name != target.name).startswith(".front.parquet.")


@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_pareto_plot_path_is_checked_before_any_output(tmp_path, capsys, where):
    """Before, `xkd pareto --plot afile/front.png` printed the table, then died with a
    FileExistsError traceback."""
    experiment = _registry(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "plots").mkdir()
    plot = tmp_path / ("afile/front.png" if where == "under a file" else "plots")
    assert xkd_main(["pareto", str(experiment), "--plot", str(plot)]) == 2
    captured = capsys.readouterr()
    expected = "afile exists and is not a folder" if where == "under a file" else "is a folder; name the PNG file"
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and expected in captured.err
    assert list((tmp_path / "plots").iterdir()) == []
