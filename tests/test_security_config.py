"""Absurd config values are refused at load, with sensible bounds, before any work; a huge YAML file
is refused before it is parsed."""

from __future__ import annotations

import time

import pytest

from xkd_ray.config.schema import ExperimentConfig, load_config
from xkd_ray.errors import XKDConfigError

ABSURD = [
    ({"distill.epochs": 10**9}, "distill.epochs: got 1000000000; must be <= 10000"),
    ({"teacher.epochs": 10**9}, "teacher.epochs: got 1000000000; must be <= 10000"),
    ({"distill.batch_size": 10**9}, "distill.batch_size: got 1000000000; must be <= 65536"),
    ({"student.width": 10**7}, "student.width: got 10000000; must be <= 4096"),
    ({"teacher.width": 10**7}, "teacher.width: got 10000000; must be <= 4096"),
    ({"data.image_size": 10**6}, "data.image_size: got 1000000; must be <= 2048"),
    ({"data.val_fraction": 0.0}, "data.val_fraction: got 0.0; must be > 0"),
    ({"distill.temperature": 1e-300}, "distill.temperature: got 1e-300; must be >= 0.01"),
    ({"distill.lr": 1e308}, "distill.lr: got 1e+308; must be <= 1000000"),
    ({"explain.cache_dir": "cache\0x"}, "explain.cache_dir: contains a NUL byte"),
    ({"explain.cache_dir": "runs/../../etc"}, "explain.cache_dir: 'runs/../../etc' has a '..' part"),
]


@pytest.mark.parametrize(
    ("override", "message"), ABSURD, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(ABSURD)]
)
def test_absurd_values_are_refused_at_load(override, message):
    """11 values the schema used to accept and training would choke on (hours of allocation, a
    division by ~0, an empty validation split, a path with NUL or '..'): one line naming the field."""
    with pytest.raises(XKDConfigError) as refused:
        ExperimentConfig().with_overrides(override)
    assert str(refused.value).startswith(message), str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_bounds_keep_every_real_value():
    """The values the tests and benchmarks use stay valid: lr 1e6 (the fault tests' diverging run),
    temperature 0.5 and 20, 1,000 epochs, batch 4,096, width 512, 224 px images, val_fraction 0.01."""
    config = ExperimentConfig().with_overrides(
        {"distill.lr": 1e6, "distill.temperature": 20, "distill.epochs": 1000, "distill.batch_size": 4096,
         "student.width": 512, "data.image_size": 224, "data.val_fraction": 0.01, "explain.cache_dir": "a/b/.cache"}
    )  # fmt: skip
    assert config.distill.lr == 1e6 and config.data.image_size == 224
    assert ExperimentConfig().with_overrides({"distill.temperature": 0.5}).distill.temperature == 0.5


def test_a_huge_yaml_file_is_refused_before_parsing(tmp_path):
    """A 10 MB file holding one 5M-item list: refused in one line within seconds (before: `load_config`
    still parsing after 120 s at 2.9 GB)."""
    path = tmp_path / "huge.yaml"
    path.write_text("distill:\n  method: [" + "1," * 5_000_000 + "1]\n")
    started = time.monotonic()
    with pytest.raises(XKDConfigError, match=r"huge.yaml: larger than 1048576 bytes; not a config"):
        load_config(path)
    assert time.monotonic() - started < 10
