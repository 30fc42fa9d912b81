"""Shared fixtures: one tiny prepared experiment and one local Ray instance per test session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest

from xkd_ray.config import ExperimentConfig

TINY_OVERRIDES = {
    "data.image_size": 16,
    "teacher.width": 8,
    "teacher.epochs": 3,
    "student.width": 8,
    "student.ae_width": 8,
    "student.ae_depth": 2,
    "distill.epochs": 2,
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("xkd_cache"))


@pytest.fixture(scope="session")
def tiny_config(cache_dir) -> ExperimentConfig:
    """Digits at 16x16 with a small teacher: seconds to train, same code paths as the default."""
    return ExperimentConfig().with_overrides({**TINY_OVERRIDES, "explain.cache_dir": cache_dir})


@pytest.fixture(scope="session")
def tiny_data(tiny_config):
    from xkd_ray.distill import prepare

    return prepare(tiny_config, progress=False)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
