"""Progress off a terminal: plain, flushed lines a log keeps (``xkd_ray.core.progress``), not a silent bar."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import FRESH_TEACHER, REPO, TIMING, TINY_OVERRIDES
from xkd_ray.core.progress import DEFAULT_INTERVAL_S, INTERVAL_ENV, interval_from_env, progress_line, track


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.slow  # a real teacher run in a subprocess: the full suite runs it, make test-fast does not
def test_a_real_teacher_run_logs_its_epochs_when_stdout_is_a_file(tmp_path):
    """The user report: ``xkd teacher`` with stdout redirected (as under ``ray job logs``) printed nothing."""
    sets = [arg for key, value in FRESH_TEACHER.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "xkd_ray.ui.cli", "teacher", *sets, "--set", f"explain.cache_dir={tmp_path / 'c'}"]
    env = {key: value for key, value in os.environ.items() if key not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env[INTERVAL_ENV] = "0"  # XKD_PLUGINS and PYTHONPATH come from tests/conftest.py
    log = tmp_path / "stdout.log"
    with log.open("w") as stdout:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=stdout, stderr=subprocess.PIPE, timeout=600)
    text = log.read_text()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    epochs = TINY_OVERRIDES["teacher.epochs"]
    lines = [line for line in text.splitlines() if line.startswith("teacher epochs:")]
    assert len(lines) == epochs, text  # interval 0: one line per epoch
    for done, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"teacher epochs: {done}/{epochs} \(\d+%\) {TIMING} loss=[\d.]+", line), line
    assert lines[-1].startswith(f"teacher epochs: {epochs}/{epochs} (100%)")
    assert re.search(rf"^teacher gradcam \(train\): (\d+)/\1 \(100%\) {TIMING}$", text, re.MULTILINE), text
    assert "\x1b[" not in text and not re.search(r"(epochs|gradcam).*━", text)  # no bar drawn into the file


def test_line_format():
    line = progress_line("teacher epochs", 3, 20, 42.0, {"loss": 0.41, "split": "val"})
    assert line == "teacher epochs: 3/20 (15%) elapsed 0:00:42 rate 0.0714/s eta 0:03:58 loss=0.41 split=val"
    fast = progress_line("explaining", 12_000, 12_000, 0.5, {})
    assert fast == "explaining: 12000/12000 (100%) elapsed 0:00:00 rate 24000/s eta 0:00:00"
    assert progress_line("x", 0, 5, 0.0, {}) == "x: 0/5 (0%) elapsed 0:00:00 rate ? eta ?"


def test_lines_come_at_the_first_update_every_interval_and_at_the_end():
    clock, out = FakeClock(), io.StringIO()
    with track("student epochs", 5, interval_s=10.0, stream=out, live=False, clock=clock) as bar:
        for now in (1.0, 5.0, 11.0, 12.0, 13.0):  # printed: first, 10 s after it, last
            clock.now = now
            bar.advance(loss=now)
    assert out.getvalue().splitlines() == [
        "student epochs: 1/5 (20%) elapsed 0:00:01 rate 1/s eta 0:00:04 loss=1",
        "student epochs: 3/5 (60%) elapsed 0:00:11 rate 0.273/s eta 0:00:07 loss=11",
        "student epochs: 5/5 (100%) elapsed 0:00:13 rate 0.385/s eta 0:00:00 loss=13",
    ]


def test_a_step_that_fails_still_says_how_far_it_got():
    clock, out = FakeClock(), io.StringIO()
    with (
        pytest.raises(RuntimeError),
        track("teacher epochs", 5, interval_s=60.0, stream=out, live=False, clock=clock) as bar,
    ):
        for now in (1.0, 2.0):
            clock.now = now
            bar.advance()
        raise RuntimeError("diverged")
    assert [line.split(" elapsed")[0] for line in out.getvalue().splitlines()] == [
        "teacher epochs: 1/5 (20%)",
        "teacher epochs: 2/5 (40%)",
    ]


def test_disabled_prints_nothing():
    out = io.StringIO()
    with track("quiet", 3, enabled=False, stream=out, live=False) as bar:
        bar.advance(3)
    assert out.getvalue() == ""


@pytest.mark.parametrize(("value", "expected"), [(None, DEFAULT_INTERVAL_S), ("0", 0.0), (" 2.5 ", 2.5)])
def test_interval_from_the_environment(value, expected):
    assert interval_from_env({} if value is None else {INTERVAL_ENV: value}) == expected


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_warns_and_keeps_the_default(value):
    with pytest.warns(UserWarning, match=INTERVAL_ENV):
        assert interval_from_env({INTERVAL_ENV: value}) == DEFAULT_INTERVAL_S
