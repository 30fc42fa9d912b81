"""Every benchmark script runs in its tiny mode and ends with a RESULT line, so none can rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))


def test_every_bench_script_is_covered():
    assert set(SCRIPTS) >= {
        "paper_claim.py",
        "explain_cache.py",
        "scaling.py",
        "train_overhead.py",
        "search_quality.py",
    }


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_smoke(script, tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        cwd=BENCH.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT( [a-z_]+=[-0-9.naif]+)+", last), last
