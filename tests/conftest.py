"""Shared fixtures: one tiny prepared experiment and one local Ray instance per test session.

Tests that use the session's Ray (``ray_local``) are marked ``slow`` at collection, so
``make test-fast`` runs the suite without Ray.

Two environment variables are set before anything imports xkd_ray or starts Ray, so every
process of the session (Ray workers, subprocesses, submitted jobs) inherits them:
``XKD_PLUGINS`` registers the test plugin's method, metric, explainer and dataset (proof that a
registry entry is all an addition needs), and ``XKD_FAULTS`` names the file the fault tests
write their rules to (``xkd_ray.testing.faults``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "search_spaces" / "smoke.yaml"
FAULTS_FILE = Path(tempfile.mkdtemp(prefix="xkd-faults-")) / "faults.json"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# One intra-op thread per process (this one, its subprocesses, and Ray's workers, which inherit it):
# the suite runs two pytest workers on two cores, each with Ray workers and CLI subprocesses
# beside it, and torch's default (a thread per core in every process) oversubscribes the cores
# with OpenMP threads that spin while they wait. Measured on 2 cores: `make test-fast` 3:53 with
# the default, 2:09 with one thread (CPU time 7:23 -> 3:57). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray Train starts a PreemptionWatcher actor per run (a process of its own, 1.4 s of CPU each, 19
# runs in a suite: measured by process kind) to notice spot-instance drains, which no test but the
# multi-node one could see; that one (tests/test_cluster.py) turns it back on, as users run it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ["XKD_PLUGINS"] = "tests.registry_plugin"
os.environ["XKD_FAULTS"] = str(FAULTS_FILE)
# The per-user key that signs experiment folders (xkd_ray.pareto.experiment_folder): one per session.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="xkd-config-")
# Staging copies of s3:// experiments (xkd_ray.pareto.storage): one per session.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="xkd-cache-home-")
# Object storage: a real S3 server process (moto's server mode) on this port, started by the
# `s3_server` fixture. Set before Ray starts, so its workers see the same endpoint; it accepts any
# credentials (tests/test_storage.py starts a second, credential-checking one).
S3_PORT = _free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "xkd-test",
        "AWS_SECRET_ACCESS_KEY": "xkd-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402
import yaml  # noqa: E402

from xkd_ray.config.schema import ExperimentConfig  # noqa: E402
from xkd_ray.config.space import SearchSpec  # noqa: E402

TINY_OVERRIDES = {
    "data.image_size": 16,
    "teacher.width": 8,
    "teacher.epochs": 3,
    "student.width": 8,
    "student.ae_width": 8,
    "student.ae_depth": 2,
    "distill.epochs": 2,
    # 20 of the 200 default images (two per class) and 3 ROAD fractions per faithfulness measurement:
    # most of a tiny run's time is its evaluation otherwise (one xd student, one core: 13.4 s at the
    # defaults, 4.0 s at 64 images and 5 fractions, 2.0 s here); the metrics and code paths are the same.
    "faithfulness.images": 20,
    "faithfulness.road_steps": 3,
}


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that needs the session's Ray (``ray_local``, directly or through a fixture such
    as ``smoke_experiment``) is ``slow``: starting Ray and running Train/Tune on it is what makes a
    test slow here, so ``make test-fast`` (``-m "not slow"``) never starts Ray in this process.

    With pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) each worker process is a session
    of its own, with its own ``ray_local`` started on first use, and the Ray tests spread over both
    workers: that keeps both cores busy to the end (in one worker, one after another, they took
    1,780 s of a 1,653 s run). Only ``OWN_CLUSTER`` tests are grouped into one worker."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# The timing tail of a plain progress line (``xkd_ray.core.progress``), for tests that read logs.
TIMING = r"elapsed \d+:\d\d:\d\d rate [\d.]+/s eta (\d+:\d\d:\d\d|\?)"
# A fresh teacher on a fifth of digits' training split: every progress line, in a fifth of the time.
FRESH_TEACHER = {**TINY_OVERRIDES, "data.max_train_samples": 240}

# For a test that starts and stops a Ray cluster of its own (``ray start``, ``cluster_utils``): these
# run one after another in one worker, so no two such clusters compete for the cores at once.
OWN_CLUSTER = pytest.mark.xdist_group("own_cluster")
# The tests that read a costly shared fixture run in one pytest-xdist worker: a session or module
# fixture is built once per worker that asks for it, and these were built twice (a smoke search
# 66 + 37 s, the served student 12 + 12 s, the Ray Train fault search 60 + 61 s in CI runs).
# (A ControllerError once blamed on grouping tests/test_train.py was the placement-group removal
# that tests/cluster_search.py now prevents.)
SMOKE_SEARCH = pytest.mark.xdist_group("smoke_search")  # ``smoke_experiment``
FAULTY_SEARCH = pytest.mark.xdist_group("faulty_search")  # tests/test_faults.py's ``faulty_search``
TWO_WORKER_RUN = pytest.mark.xdist_group("two_worker_run")  # tests/test_train.py's ``two_worker_run``


RAY_BIN = str(Path(sys.executable).parent / "ray")
HEAD_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
)


@contextmanager
def ray_head(env: dict[str, str], *, dashboard: bool = False, cwd: Path | None = None):
    """A Ray head of the test's own, started by `ray start --head --block` as on a cluster; yields
    ``(gcs_address, dashboard_url or None)`` once it answers.

    Every port is picked free: the session's Ray and the local Rays that CLI subprocesses start take
    Ray's fixed defaults (the dashboard agent's 52365 above all, which ``ray.init(address="local")``
    cannot move), and a second Ray on that port has no job agent. Its temp folder is short (Ray's
    socket paths are length-limited). Stopped by killing the process group of its ``--block`` process, which
    holds what it started: ``ray stop`` would stop every Ray on the machine, the session's included."""
    # Without RAY_AUTH_MODE, Ray turns token auth on when ~/.ray/auth_token exists (a machine's
    # leftover): say what the test means, off unless the caller asked for it.
    env = {"RAY_AUTH_MODE": "disabled", **env}
    gcs_port, dashboard_port = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="xkdhead-", dir="/tmp")
    ports = [f"--{name}={_free_port()}" for name in HEAD_PORTS]
    shown = [f"--include-dashboard={str(dashboard).lower()}"]
    if dashboard:
        shown += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    head = subprocess.Popen(
        [RAY_BIN, "start", "--head", "--block", "--num-cpus=2", f"--port={gcs_port}", f"--temp-dir={temp_dir}",
         *shown, *ports],
        env=env, cwd=cwd or temp_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    gcs_address = f"127.0.0.1:{gcs_port}"
    dashboard_url = f"http://127.0.0.1:{dashboard_port}" if dashboard else None
    if dashboard:
        ready = [RAY_BIN, "job", "list", f"--address={dashboard_url}"]
    else:
        ready = [RAY_BIN, "status", f"--address={gcs_address}"]
    try:
        wait_for(lambda: subprocess.run(ready, env=env, capture_output=True).returncode == 0, 180, "the Ray head", head)
        yield gcs_address, dashboard_url
    finally:
        # Killed, not stopped: on SIGTERM `ray start --block` gives its processes a graceful exit that
        # took 30 s per head (the dashboard's), and nothing of this head outlives the test to need one.
        # Its processes (GCS, raylet, dashboard, workers) are all in the session it was started in.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def injected_faults(rules: list[dict]):
    """Arm ``xkd_ray.testing.faults`` rules for the duration of a block (read by every Ray process)."""
    FAULTS_FILE.write_text(json.dumps(rules))
    try:
        yield
    finally:
        FAULTS_FILE.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("xkd_cache"))


@pytest.fixture(scope="session")
def tiny_config(cache_dir) -> ExperimentConfig:
    """Digits at 16x16 with a small teacher: seconds to train, same code paths as the default."""
    return ExperimentConfig().with_overrides({**TINY_OVERRIDES, "explain.cache_dir": cache_dir})


@pytest.fixture(scope="session")
def tiny_data(tiny_config):
    from xkd_ray.core.prepared import prepare

    return prepare(tiny_config, progress=False)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds). With its dashboard, as
    `ray start` runs it: Ray Train frees a stopped trial's CPUs through the state API it serves."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Poll ``predicate`` until it holds (a condition, never a fixed sleep); fail naming ``what``
    after ``timeout`` seconds, or at once when ``process`` (the one expected to make it true) exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited with {process.returncode} before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


HELD_TEMPERATURE = 7.0


def held_trial_points(holding: Path, finished_before: int = 1) -> tuple[list[dict], list[dict]]:
    """Initial points and a ``hold`` fault rule (xkd_ray.testing.faults) that stop a search at a
    known point: its first ``finished_before`` trials run, the next waits before training (and
    touches ``holding``) while the rule is armed (``injected_faults``). With
    ``max_concurrent_trials: 1``, once ``holding`` exists and ``finished_before`` trials are
    recorded, exactly those have finished and none is training: an interruption then is no race."""
    points = [{"distill.temperature": 2.0 + index * 0.5} for index in range(finished_before)]
    points.append({"distill.temperature": HELD_TEMPERATURE})
    rules = [{"fault": "hold", "when": {"distill.temperature": HELD_TEMPERATURE}, "holding": str(holding)}]
    return points, rules


def start_s3_server(port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1:port, once it answers."""
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server
        if server.poll() is not None:
            raise RuntimeError(f"moto server exited with {server.returncode}")
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto server did not start within 60 s")


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 endpoint (the AWS_* variables above point at it) with an empty bucket ``xkd``."""
    import pyarrow.fs as pafs

    from xkd_ray.pareto.storage import s3_filesystem

    server = start_s3_server(S3_PORT)
    filesystem = s3_filesystem()
    pafs.S3FileSystem(**{**_s3_options(), "allow_bucket_creation": True}).create_dir("xkd")
    yield filesystem
    server.terminate()
    server.wait(timeout=30)


def _s3_options() -> dict[str, str]:
    return {"endpoint_override": f"127.0.0.1:{S3_PORT}", "scheme": "http", "region": "us-east-1"}


def plain_torch_resnet18(images, labels, classes: int = 10):
    """A torchvision resnet18 trained one epoch in plain torch (AdamW, batches of 64, seed 0), no
    xkd_ray code: the teacher a user brings (``teacher.arch: torchvision.resnet18`` + its weights)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for start in range(0, len(labels), 64):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images[start : start + 64]), labels[start : start + 64]).backward()
        optimizer.step()
    return model.eval()


def digits_image_folder(root: Path, count: int = 300) -> Path:
    """The first ``count`` scikit-learn digits as an ImageFolder tree (``train/<class>/``,
    ``test/<class>/``, every 7th image in test): a real image folder, written in a second."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for index in range(count):
        split = "test" if index % 7 == 0 else "train"
        folder = root / split / str(bunch.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((bunch.images[index] / 16 * 255).astype(np.uint8)).save(folder / f"{index}.png")
    return root


def seed_session_teacher(cache_dir: str, teacher_id: str, fresh_cache: str | Path) -> None:
    """Copy the session's trained teacher (``tiny_data``'s) into a fresh cache, with no
    explanations: a search on that cache explains every split itself but does not train the
    teacher again (the smoke space's teacher config is the session's, so the same id). Training
    the teacher on Ray workers is checked where it is the subject (test_ray_teacher,
    test_cluster, test_ray_head's job)."""
    teacher = Path(cache_dir) / "teachers" / f"teacher-{teacher_id}"
    shutil.copytree(teacher, Path(fresh_cache) / "teachers" / teacher.name)


def smoke_space(tmp_path: Path, cache_dir: str, **search: object) -> Path:
    """The shipped smoke space with its cache moved to ``cache_dir`` and ``search`` settings replaced."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["base"]["explain"]["cache_dir"] = cache_dir
    raw["search"].update(search)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def smoke_experiment(ray_local, cache_dir, tiny_data, tmp_path_factory, request):
    """One smoke search (4 trials), run in this process on the session's local Ray.

    Its cache starts with the session's teacher and no explanations (``seed_session_teacher``):
    the search explains every split itself, which its tests count."""
    import xkd_ray.core.explain as explain_module
    from tests.registry_plugin import PLUGIN_METHOD
    from xkd_ray.cluster.ray_search import run_search
    from xkd_ray.config.space import load_search_space

    tmp = tmp_path_factory.mktemp("search")
    fresh_cache = str(tmp / "cache")
    seed_session_teacher(cache_dir, tiny_data.teacher_id, fresh_cache)
    # The test plugin's method joins the choices and is tried first (tests/test_registries.py).
    # MLflow and TensorBoard tracking on, so test_search_tracking reads this search's store back.
    path = smoke_space(
        tmp, fresh_cache, initial_points=[{"distill.method": PLUGIN_METHOD}], tracking=["mlflow", "tensorboard"]
    )
    raw = yaml.safe_load(path.read_text())
    raw["space"]["distill.method"]["choice"].append(PLUGIN_METHOD)
    path.write_text(yaml.safe_dump(raw))
    spec = load_search_space(path)
    writes: list[str] = []
    original = explain_module.write_teacher_outputs

    def counting_write(path, outputs, metadata):
        writes.append(str(path))
        return original(path, outputs, metadata)

    import xkd_ray.cluster.ray_explain as ray_explain_module

    patcher = pytest.MonkeyPatch()
    patcher.setattr(explain_module, "write_teacher_outputs", counting_write)  # the single-process path
    patcher.setattr(ray_explain_module, "write_teacher_outputs", counting_write)  # the workers' job (the search's)
    warnings = _WarningRecords()  # what Ray Tune's loggers warned about while the search ran
    tune_logger = logging.getLogger("ray.tune")
    tune_logger.addHandler(warnings)
    try:
        summary = run_search(spec, tmp / "experiment", live=False)
    finally:
        patcher.undo()
        tune_logger.removeHandler(warnings)
    return SmokeSearch(tmp / "experiment", summary, writes, Path(fresh_cache), spec, warnings.messages)


class SmokeSearch(NamedTuple):
    experiment: Path
    summary: dict
    explanation_writes: list[str]  # every teacher-output file written while the search ran
    cache: Path
    spec: SearchSpec  # the space it ran
    tune_warnings: list[str]  # Ray Tune's WARNING+ log messages during the search


class _WarningRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
