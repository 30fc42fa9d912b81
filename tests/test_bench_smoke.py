"""Every benchmark script runs in its tiny mode and ends with a RESULT line, so none can rot."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))
# Caches of the developer tools (and other sessions' pytest runs) may change while a script runs;
# they are not the scripts' output. Everything else in the repo, ignored paths included, is checked.
TOOL_PATHS = re.compile(r"(^|/)(\.venv|\.ruff_cache|\.pytest_cache|\.hypothesis|__pycache__)/")
_PAIR = re.compile(r"([a-z_][a-z0-9_]*)=(\S+)")


def parse_result_line(stdout: str) -> dict[str, float]:
    """The ``RESULT key=value ...`` last line of a bench script's output, every value a finite number."""
    lines = stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("RESULT "):
        raise ValueError(f"no RESULT line at the end of the output: {lines[-1] if lines else ''!r}")
    tokens = lines[-1].split()[1:]
    if not tokens:
        raise ValueError("RESULT line without any key=value")
    values: dict[str, float] = {}
    for token in tokens:
        match = _PAIR.fullmatch(token)
        if match is None:
            raise ValueError(f"not key=value: {token!r}")
        key, text = match.groups()
        if key in values:
            raise ValueError(f"key {key!r} twice")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{key}={text!r} is not finite")
        values[key] = value
    return values


def _untracked_and_ignored() -> set[str]:
    """Untracked and ignored files of the repo, one per line (no folder collapsing)."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line[3:] for line in status.splitlines() if line[:2] in ("??", "!!") and not TOOL_PATHS.search(line[3:])}


def test_parse_result_line_accepts_finite_numbers():
    assert parse_result_line("some log\nRESULT a=1.5 b=2\n") == {"a": 1.5, "b": 2.0}
    assert parse_result_line("RESULT x_vs_random=-0.25 y=1e-3") == {"x_vs_random": -0.25, "y": 0.001}


@pytest.mark.parametrize(
    "stdout",
    [
        "RESULT a=nan",
        "RESULT a=1.0 b=NaN",
        "RESULT a=inf",
        "RESULT a=-inf",
        "RESULT a=Infinity",
        "RESULT a=1e999",  # overflows to inf
        "RESULT a=abc",
        "RESULT a=",
        "RESULT a=1 a=2",
        "RESULT A=1",
        "RESULT a=1 b",
        "RESULT",
        "RESULT ",
        "",
        "all done, a=1.5",
        "RESULT a=1.5\nmore output after it",
        "result a=1.5",
    ],
)
def test_parse_result_line_refuses(stdout):
    with pytest.raises(ValueError):
        parse_result_line(stdout)


# Scripts `make bench` does not run, each with its reason; every other script in bench/ must be
# in the `bench` target, so "every figure in one go" stays true when a script is added.
NOT_IN_MAKE_BENCH = {
    "cluster_pipeline.py": "its own run: the teacher-on-workers table (README)",
    "gpu_teacher.py": "needs a GPU (gpu_path.py measures the CPU alone where there is none)",
}


def _make_bench_scripts() -> set[str]:
    """The bench scripts named in the Makefile's ``bench`` recipe."""
    recipe, inside = [], False
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("bench:"):
            inside = True
        elif inside and not line.startswith("\t"):
            break
        elif inside:
            recipe.append(line)
    return set(re.findall(r"bench/([a-z_0-9]+\.py)", "\n".join(recipe)))


def test_make_bench_runs_every_script_not_listed_as_separate():
    assert SCRIPTS, f"no bench script found in {BENCH}: test_bench_smoke would run nothing"
    in_make = _make_bench_scripts()
    assert in_make, "the Makefile's bench recipe names no script"
    missing = set(SCRIPTS) - in_make - set(NOT_IN_MAKE_BENCH)
    assert not missing, f"bench scripts neither in `make bench` nor in NOT_IN_MAKE_BENCH: {sorted(missing)}"
    stale = {name for name in NOT_IN_MAKE_BENCH if name not in SCRIPTS or name in in_make}
    assert not stale, f"NOT_IN_MAKE_BENCH names scripts that are gone or are in `make bench`: {sorted(stale)}"


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_smoke(script, tmp_path):
    # No script has a cache/output option: in --smoke mode they write to ".xkd_cache/smoke"
    # relative to the working directory (search_quality: the default ".xkd_cache" and a temp
    # folder), so they run from tmp_path, with the one relative input they read copied there.
    shutil.copytree(REPO / "search_spaces", tmp_path / "search_spaces")
    before = _untracked_and_ignored()
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",  # no bench/__pycache__ from `import train_overhead`
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    values = parse_result_line(result.stdout)
    assert values, result.stdout[-2000:]
    created = sorted(_untracked_and_ignored() - before)
    assert not created, f"{script} wrote inside the repo: {created[:20]}"
