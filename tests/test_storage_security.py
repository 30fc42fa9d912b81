"""Object storage you can trust: nothing from a bucket runs, escapes the local copy or breaks another
reader; files readers open are regular, bounded and in range. Against a real local S3 server
(moto's server mode, tests/conftest.py) where storage is involved; no Ray in this module except
where a test says so."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, TINY_OVERRIDES, smoke_space
from xkd_ray.config.space import load_search_space
from xkd_ray.core.checkpoints import write_model_folder
from xkd_ray.core.models import StudentNet
from xkd_ray.errors import XKDCheckpointError, XKDConfigError
from xkd_ray.pareto.experiment_folder import (
    MANIFEST,
    FolderLock,
    check_tune_seal,
    open_experiment,
    seal_tune_state,
)
from xkd_ray.pareto.front import list_pareto_students, load_pareto_student, record_trial, update_registry
from xkd_ray.pareto.storage import open_storage, staging_folder, upload_registry

ARCHITECTURE = {"in_channels": 1, "num_classes": 10, "width": 4, "ae_depth": 1, "ae_width": 4, "fusion": "concat"}
FIDELITIES = (0.9, 0.6, 0.3, 0.1)


def make_registry(experiment: Path, trials: int = 4) -> None:
    """A finished search's registry without Ray: real student folders, accuracy rising as fidelity
    falls, so every trial is on the front."""
    for index in range(trials):
        folder = experiment / "students" / f"t{index}"
        metrics = {"val": {"accuracy": 0.5 + 0.1 * index, "fidelity": FIDELITIES[index]}}
        write_model_folder(folder, StudentNet.from_architecture(ARCHITECTURE), {"architecture": ARCHITECTURE}, metrics)
        row = {"trial_id": f"t{index}", "method": "xd", "status": "ok", "config": {}, "student_dir": str(folder),
               **{f"val_{k}": v for k, v in metrics["val"].items()}}  # fmt: skip
        record_trial(experiment, row)
        update_registry(experiment, lambda model, record: {"accuracy": 0.8, "fidelity": 0.5})


def uploaded_registry(tmp_path: Path, url: str) -> Path:
    experiment = tmp_path / "experiment"
    make_registry(experiment)
    upload_registry(open_storage(url, check=False), experiment)
    return experiment


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xkd_ray.ui.cli", *args], capture_output=True, text=True, timeout=300,
        cwd=REPO, env={**os.environ, **(env or {})},
    )  # fmt: skip


class Payload:
    """A pickle that creates a file when loaded: the proof that code from the bucket ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_tune_state_changed_in_the_bucket(s3_server, tmp_path, cache_dir):
    """A prefix holding this user's signed manifest and a crafted ``tune/tuner.pkl``: `xkd search
    --resume` exits 2 with one line before Ray starts, and the pickle never runs (before: it ran,
    then an AttributeError traceback). A sealed state passes the check; changed after sealing, refused."""
    space = smoke_space(tmp_path, cache_dir)
    url = "s3://xkd/tampered"
    storage = open_storage(url)
    staging = staging_folder(url)
    staging.mkdir(parents=True, exist_ok=True)
    with FolderLock(staging) as lock:
        open_experiment(staging, load_search_space(space), resume=False, allow_space_change=False, trust=False)
        lock.claim()
    storage.upload(staging / MANIFEST, MANIFEST)
    marker = tmp_path / "payload-ran"
    with s3_server.open_output_stream(storage.path("tune/tuner.pkl")) as stream:
        stream.write(pickle.dumps(Payload(marker)))
    shutil.rmtree(staging)  # resumed from another machine
    run = subprocess.run(
        [sys.executable, str(REPO / "xkd_ray" / "search.py"), "--space", str(space), "--out", url, "--resume",
         "--no-live", "--address", "local"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "tune/tuner.pkl is not sealed by this user's search" in run.stderr
    assert not marker.exists()
    # Sealed by this user: accepted; the pickle replaced afterwards: refused, naming it.
    staging.mkdir(parents=True, exist_ok=True)
    with s3_server.open_output_stream(storage.path("tune/tuner.pkl")) as stream:
        stream.write(b"this user's state")
    seal_tune_state(storage, staging)
    check_tune_seal(storage, staging)
    with s3_server.open_output_stream(storage.path("tune/tuner.pkl")) as stream:
        stream.write(pickle.dumps(Payload(marker)))
    with pytest.raises(XKDConfigError, match=r"tune/tuner.pkl changed since this user's search sealed"):
        check_tune_seal(storage, staging)


@pytest.mark.slow  # nine CLI processes against the S3 server
def test_bucket_keys_cannot_escape_the_snapshot_and_missing_buckets_are_named(s3_server, tmp_path):
    """An object ``PREFIX/pareto/../../../../<outside>/evil.txt``: `xkd pareto` exits 2 with one line
    naming the key and creates nothing outside its snapshot (before: it created the outside folder,
    then a FileNotFoundError traceback, exit 1). Run 8 times: never SIGABRT (pyarrow's S3 finalised at
    exit; before, 4 of 15 such runs died with 134). A missing bucket is named, not 'no front yet'."""
    url = "s3://xkd/escape"
    uploaded_registry(tmp_path, url)
    outside = Path(f"/tmp/xkd-escape-{os.getpid()}")
    key = f"escape/pareto/../../../..{outside}/evil.txt"
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.put_object(Bucket="xkd", Key=key, Body=b"evil")
    codes = []
    for _ in range(8):
        run = _cli("pareto", url)
        codes.append(run.returncode)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "leaves its folder; refusing to copy it" in run.stderr
    assert codes == [2] * 8
    assert not outside.exists()
    missing = _cli("pareto", "s3://nobucket/p")
    assert missing.returncode == 2 and "the bucket 'nobucket' does not exist" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


READER = """
import sys
from xkd_ray.pareto.front import load_pareto_student
failures = 0
for _ in range(8):
    try:
        load_pareto_student(sys.argv[1])
    except Exception as exc:
        failures += 1
        print(type(exc).__name__, exc, file=sys.stderr)
print("failures", failures)
"""


@pytest.mark.slow  # reader processes against the S3 server: the full suite runs it, make test-fast does not
def test_concurrent_readers_of_one_url_never_break_each_other(s3_server, tmp_path):
    """3 processes x 8 `load_pareto_student("s3://...")` of one finished front, at once: 0 failures
    (before: 8 of 24 failed 'no Pareto front yet', each call deleting the others' snapshot); each
    process's snapshots are gone once it exits."""
    url = "s3://xkd/readers"
    uploaded_registry(tmp_path, url)
    readers = [
        subprocess.Popen([sys.executable, "-c", READER, url], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]  # fmt: skip
    results = [reader.communicate(timeout=600) for reader in readers]
    assert [out.strip() for out, _ in results] == ["failures 0"] * 3, [err[-2000:] for _, err in results]
    snapshots = Path(os.environ["XDG_CACHE_HOME"]) / "xkd-ray" / "snapshots"
    pids = {str(reader.pid) for reader in readers}
    assert not [p for p in snapshots.glob("*") if p.name.split("-")[1] in pids]


def _front_rows(experiment: Path) -> list[dict]:
    return pq.read_table(experiment / "pareto" / "front.parquet").to_pylist()


def _write_front(experiment: Path, rows: list[dict]) -> None:
    schema = pq.read_schema(experiment / "pareto" / "front.parquet")
    (experiment / "pareto" / "front.parquet").unlink()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), experiment / "pareto" / "front.parquet")


@pytest.mark.slow  # a CLI process per reader: the full suite runs it, make test-fast does not
def test_symlinks_and_non_files_are_refused_for_every_file_readers_open(tmp_path):
    """A front student's model.pt, config.json, metrics.json, and the front.parquet and summary.json,
    each replaced in turn by a symbolic link to a good copy outside the experiment (5 cases): refused
    with one line `is a symbolic link`, never followed (before: followed and loaded). front.parquet
    as a folder and as a link to /dev/zero: one line each, at once (before: IsADirectoryError, and
    killed for memory)."""
    experiment = tmp_path / "experiment"
    make_registry(experiment)
    outside = tmp_path / "outside"
    shutil.copytree(experiment, outside)
    knee = load_pareto_student(experiment).path.relative_to(experiment)
    for relative in (knee / "model.pt", knee / "config.json", knee / "metrics.json",
                     Path("pareto/front.parquet"), Path("summary.json")):  # fmt: skip
        target = experiment / relative
        target.unlink()
        target.symlink_to(outside / relative)
        with pytest.raises(XKDCheckpointError, match="is a symbolic link") as refused:
            load_pareto_student(experiment)
        assert str(target) in str(refused.value)
        target.unlink()
        shutil.copy(outside / relative, target)
    front = experiment / "pareto" / "front.parquet"
    front.unlink()
    front.mkdir()
    run = _cli("pareto", str(experiment))
    assert run.returncode == 2 and "is not a regular file" in run.stderr, run.stderr
    front.rmdir()
    front.symlink_to("/dev/zero")
    started = time.monotonic()
    run = _cli("pareto", str(experiment))
    assert run.returncode == 2 and "is a symbolic link" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 60


def test_oversized_and_out_of_range_fronts_are_refused(tmp_path):
    """A front of 100,000 rows: refused in one line within seconds (before: `xkd pareto` still running
    at 40 s). Tampered values, each alone (4 cases): val_accuracy 1e308, val_fidelity 5.0 and -3.0,
    test_accuracy NaN: refused naming the column and the metric's range from the METRICS registry
    (before: accepted and the knee chosen from them)."""
    experiment = tmp_path / "experiment"
    make_registry(experiment)
    good = _front_rows(experiment)
    for column, value, problem in (
        ("val_accuracy", 1e308, "outside the metric's range [0.0, 1.0]"),
        ("val_fidelity", 5.0, "outside the metric's range [-1.0, 1.0]"),
        ("val_fidelity", -3.0, "outside the metric's range [-1.0, 1.0]"),
        ("test_accuracy", float("nan"), "not a finite number"),
    ):
        _write_front(experiment, [{**good[0], column: value}, *good[1:]])
        with pytest.raises(XKDCheckpointError, match=re.escape(problem)) as refused:
            load_pareto_student(experiment)
        assert column in str(refused.value)
    _write_front(experiment, [{**good[0], "trial_id": f"x{i}"} for i in range(100_000)])
    started = time.monotonic()
    run = _cli("pareto", str(experiment))
    assert run.returncode == 2, run.stderr
    assert "100000 rows, more than the 20000 a reader accepts" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30
    _write_front(experiment, good)
    assert list_pareto_students(experiment).num_rows == len(good)


def test_atomic_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    """Before the rename the new file's content is fsynced, after it the folder (so a power loss
    cannot leave the new name on an empty file). Recorded by wrapping the real os.fsync: the kinds
    of what was synced, in order (before: nothing was synced)."""
    import stat

    from xkd_ray.core import checkpoints

    synced: list[str] = []
    real = os.fsync

    def recording(descriptor: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        real(descriptor)

    monkeypatch.setattr(checkpoints.os, "fsync", recording)
    checkpoints.atomic_write_bytes(tmp_path / "registry.bin", b"x" * 1000)
    assert synced == ["file", "folder"]
    assert (tmp_path / "registry.bin").read_bytes() == b"x" * 1000


def test_distill_takes_the_folder_lock(tmp_path, tiny_config):
    """`xkd distill --out D` while D's lock is held (as by a running search or distill): exit 2 with
    one line naming the holder, before any training (before: both ran, one student lost)."""
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out) as lock:
        lock.claim()
        settings = {**TINY_OVERRIDES, "explain.cache_dir": tiny_config.explain.cache_dir}
        run = _cli("distill", "--method", "kd", "--out", str(out), *(f"--set={k}={v}" for k, v in settings.items()))
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"in use by a running search (host {os.uname().nodename} pid {os.getpid()}" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
