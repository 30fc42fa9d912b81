"""Shared fixtures: one tiny prepared experiment and one local Ray instance per test session.

Two environment variables are set before anything imports xkd_ray or starts Ray, so every
process of the session (Ray workers, subprocesses, submitted jobs) inherits them:
``XKD_PLUGINS`` registers the test plugin's method, metric, explainer and dataset (proof that a
registry entry is all an addition needs), and ``XKD_FAULTS`` names the file the fault tests
write their rules to (``xkd_ray.faults``).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "search_spaces" / "smoke.yaml"
FAULTS_FILE = Path(tempfile.mkdtemp(prefix="xkd-faults-")) / "faults.json"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["XKD_PLUGINS"] = "tests.registry_plugin"
os.environ["XKD_FAULTS"] = str(FAULTS_FILE)
# The per-user key that signs experiment folders (xkd_ray.experiment_folder): one per session.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="xkd-config-")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402
import yaml  # noqa: E402

from xkd_ray.config import ExperimentConfig  # noqa: E402

TINY_OVERRIDES = {
    "data.image_size": 16,
    "teacher.width": 8,
    "teacher.epochs": 3,
    "student.width": 8,
    "student.ae_width": 8,
    "student.ae_depth": 2,
    "distill.epochs": 2,
}


@contextmanager
def injected_faults(rules: list[dict]):
    """Arm ``xkd_ray.faults`` rules for the duration of a block (read by every Ray process)."""
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
    from xkd_ray.prepared import prepare

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


def smoke_space(tmp_path: Path, cache_dir: str, **search: object) -> Path:
    """The shipped smoke space with its cache moved to ``cache_dir`` and ``search`` settings replaced."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["base"]["explain"]["cache_dir"] = cache_dir
    raw["search"].update(search)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def smoke_experiment(ray_local, cache_dir, tmp_path_factory, request):
    """One smoke search (4 trials), run in this process on the session's local Ray."""
    import xkd_ray.explain as explain_module
    from tests.registry_plugin import PLUGIN_METHOD
    from xkd_ray.ray_search import run_search
    from xkd_ray.space import load_search_space

    tmp = tmp_path_factory.mktemp("search")
    fresh_cache = str(tmp / "cache")
    # The test plugin's method joins the choices and is tried first (tests/test_registries.py).
    path = smoke_space(tmp, fresh_cache, initial_points=[{"distill.method": PLUGIN_METHOD}])
    raw = yaml.safe_load(path.read_text())
    raw["space"]["distill.method"]["choice"].append(PLUGIN_METHOD)
    path.write_text(yaml.safe_dump(raw))
    spec = load_search_space(path)
    writes: list[str] = []
    original = explain_module.write_teacher_outputs

    def counting_write(path, outputs, metadata):
        writes.append(str(path))
        return original(path, outputs, metadata)

    patcher = pytest.MonkeyPatch()
    patcher.setattr(explain_module, "write_teacher_outputs", counting_write)
    try:
        summary = run_search(spec, tmp / "experiment", live=False)
    finally:
        patcher.undo()
    return tmp / "experiment", summary, writes, Path(fresh_cache)
