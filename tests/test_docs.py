"""docs/REGISTRIES.md is exactly what docs/registries.py prints, so the reference cannot drift
from the registries and the config schema (regenerate with `make docs`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_registry_reference_matches_the_code():
    # conftest.py registers a test plugin through XKD_PLUGINS; the committed page lists only
    # the built-in entries.
    env = {name: value for name, value in os.environ.items() if name != "XKD_PLUGINS"}
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "registries.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    committed = (REPO / "docs" / "REGISTRIES.md").read_bytes()
    assert result.stdout == committed, "docs/REGISTRIES.md is out of date: run `make docs`"
