"""The suite's own machinery: ``OWN_CLUSTER`` tests (each starts a Ray cluster of its own) must run
one after another in one pytest-xdist worker, or two clusters compete for the two cores (a driver
once lost its GCS for 60 s that way). xdist's ``--dist loadgroup`` stopped grouping silently on
pytest 9.2 (pytest-dev/pytest-xdist#1386), hence the pin in pyproject.toml and this check."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_loadgroup_keeps_a_group_in_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(
        textwrap.dedent(
            """
            import os
            import pytest

            GROUP = pytest.mark.xdist_group("own_cluster")

            @pytest.mark.parametrize("index", range(4))
            @GROUP
            def test_grouped(index):
                with open("workers.txt", "a") as log:
                    log.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

            @pytest.mark.parametrize("index", range(4))
            def test_free(index):
                pass
            """
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    workers = (tmp_path / "workers.txt").read_text().split()
    assert len(workers) == 4 and len(set(workers)) == 1, f"the group ran on {sorted(set(workers))}"
