"""Plugins reach the workers of a real Ray cluster whose nodes were started without them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import REPO, TINY_OVERRIDES, _free_port
from tests.registry_plugin import PLUGIN_METHOD


@pytest.mark.slow
def test_a_plugin_method_trains_on_a_cluster_started_without_the_variable(tmp_path, tiny_config):
    """`ray start --head` (a subprocess, its environment without XKD_PLUGINS), then `xkd distill
    --method <the test plugin's method> --workers 1 --address` from a driver that has the variable:
    the Ray Train worker (a process of that node) imports the plugin through the job's runtime_env and
    trains the student (exit 0, model.pt saved). Before: only AWS_* were forwarded and the worker
    refused the unknown method."""
    port = _free_port()
    node_env = {k: v for k, v in os.environ.items() if k != "XKD_PLUGINS"}
    ray_tmp = tempfile.mkdtemp(prefix="xp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={ray_tmp}", "--disable-usage-stats", "--block"],
        env=node_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start exited"
            time.sleep(0.5)
        out = tmp_path / "student"
        settings = {**TINY_OVERRIDES, "explain.cache_dir": tiny_config.explain.cache_dir, "distill.epochs": 1}
        run = subprocess.run(
            [sys.executable, "-m", "xkd_ray.ui.cli", "distill", "--method", PLUGIN_METHOD, "--workers", "1",
             "--address", f"127.0.0.1:{port}", "--out", str(out), *(f"--set={k}={v}" for k, v in settings.items())],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
        assert (out / "model.pt").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):  # anything of that node still alive
                os.killpg(head.pid, signal.SIGKILL)
