"""An experiment folder knows what it is: resume guards, one live search per folder, trust,
interruption that is not mistaken for a finished search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, held_trial_points, injected_faults, smoke_space, wait_for
from xkd_ray.config.space import load_search_space
from xkd_ray.pareto.experiment_folder import MANIFEST, FolderLock, open_experiment
from xkd_ray.pareto.front import list_pareto_students, load_pareto_student, read_trials
from xkd_ray.search import main as search_main

SEARCH = [sys.executable, str(REPO / "xkd_ray" / "search.py")]


def _started_folder(tmp_path: Path, cache_dir: str) -> tuple[Path, Path]:
    """A folder in which a search has started (its manifest written as `xkd search` writes it)."""
    space = smoke_space(tmp_path, cache_dir)
    out = tmp_path / "experiment"
    out.mkdir()
    with FolderLock(out) as lock:
        open_experiment(out, load_search_space(space), resume=False, allow_space_change=False, trust=False)
        lock.claim()
    (out / "tune").mkdir()
    return space, out


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_a_different_space_is_refused_naming_the_keys(tmp_path, cache_dir, capsys):
    space, out = _started_folder(tmp_path, cache_dir)
    other = yaml.safe_load(space.read_text())
    other["base"]["distill"]["epochs"] = 1
    other["space"]["distill.method"] = {"choice": ["kd"]}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(other))
    before = _listing(out)
    assert search_main(["--space", str(changed), "--out", str(out), "--resume", "--no-live"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "space differs" in error and "base.distill.epochs" in error and "space.distill.method.choices" in error
    assert _listing(out) == before  # nothing written
    # With the explicit flag the change is accepted and recorded (checked here without Ray).
    spec = load_search_space(changed)
    with FolderLock(out):
        open_experiment(out, spec, resume=True, allow_space_change=True, trust=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["space_changes"][0]["keys"] == ["base.distill.epochs", "space.distill.method.choices"]
    with FolderLock(out):  # the recorded change is now the folder's space: same space resumes
        open_experiment(out, spec, resume=True, allow_space_change=False, trust=False)


def test_a_folder_holding_a_search_needs_resume(tmp_path, cache_dir, capsys):
    space, out = _started_folder(tmp_path, cache_dir)
    assert search_main(["--space", str(space), "--out", str(out), "--no-live"]) == 2
    assert "already holds a search; pass --resume" in capsys.readouterr().err


def test_a_second_live_search_on_the_same_folder_is_refused(tmp_path, cache_dir):
    """The lock is an OS file lock: held by a live process it refuses the second search; when
    that process is SIGKILLed the OS frees it, so a crashed search never blocks its resume."""
    space, out = _started_folder(tmp_path, cache_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from xkd_ray.pareto.experiment_folder import FolderLock; from pathlib import Path; "
         f"lock = FolderLock(Path({str(out)!r})).acquire(); lock.claim(); print('held', flush=True); "
         "import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            [*SEARCH, "--space", str(space), "--out", str(out), "--resume", "--no-live"],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert f"in use by a running search (host {os.uname().nodename} pid {holder.pid}" in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FolderLock(out):  # free again after SIGKILL
        pass


def test_resume_refuses_a_folder_this_user_did_not_create(tmp_path, cache_dir, capsys, monkeypatch):
    space, out = _started_folder(tmp_path, cache_dir)
    command = ["--space", str(space), "--out", str(out), "--resume", "--no-live"]
    spec = load_search_space(space)
    # Another user or installation: a different signing key.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "someone-else"))
    assert search_main(command) == 2
    assert "was not written by this user on this installation" in capsys.readouterr().err
    open_experiment(out, spec, resume=True, allow_space_change=False, trust=True)  # the explicit override
    monkeypatch.undo()
    # This user's folder, but its manifest edited by hand.
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["created_by"]["user"] = "mallory"
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert search_main(command) == 2
    assert "(or was edited)" in capsys.readouterr().err


def test_resume_refuses_resume_state_that_another_user_can_write(tmp_path, cache_dir, capsys):
    """Ray's resume state is a pickle: a file under tune/ that others may write could run code."""
    space, out = _started_folder(tmp_path, cache_dir)
    pickle_file = out / "tune" / "tuner.pkl"
    pickle_file.write_bytes(b"not really a pickle")
    pickle_file.chmod(0o666)
    assert search_main(["--space", str(space), "--out", str(out), "--resume", "--no-live"]) == 2
    assert "tuner.pkl is owned or writable by another user" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_ends_the_search_as_interrupted_not_finished(tmp_path, cache_dir, ray_local):
    """SIGTERM (``kill``, ``ray job stop``) stops the trials like Ctrl-C, leaves a readable
    registry, says how far it got and exits 143; before, ``ray.init``'s own SIGTERM handler
    replaced ours (exit 1, no line). Ctrl-C (exit 130) is the s3 test's interruption
    (test_storage.py). The signal comes while the second trial is held (a ``hold`` fault), so
    exactly one trial has finished: no race with the trials' speed. The search joins the
    session's Ray, as a job on a running cluster does (``ray.init`` installs its handler there too)."""
    points, rules = held_trial_points(tmp_path / "holding")
    space = smoke_space(tmp_path, cache_dir, trials=3, max_concurrent_trials=1, initial_points=points)
    out = tmp_path / "experiment"
    address = ray_local.get_runtime_context().gcs_address
    log = open(tmp_path / "search.log", "w")
    with injected_faults(rules):
        search = subprocess.Popen(
            [*SEARCH, "--space", str(space), "--out", str(out), "--no-live", "--address", address],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            held = (tmp_path / "holding").exists
            wait_for(lambda: held() and len(read_trials(out)) >= 1, 600, "one trial and the second held", search)
            search.send_signal(signal.SIGTERM)
            code = search.wait(timeout=300)
        finally:
            if search.poll() is None:
                os.killpg(search.pid, signal.SIGKILL)
            log.close()
    output = (tmp_path / "search.log").read_text()
    assert code == 143, output[-3000:]
    assert len(read_trials(out)) == 1, output[-3000:]
    assert "interrupted after 1 of 3 trials; resume with --resume" in output
    assert list_pareto_students(out).num_rows == 1  # the registry is whole and loadable
    load_pareto_student(out)
