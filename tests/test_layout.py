"""The package's layers as a user meets them: validating a config is cheap and needs no torch."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import json, sys
from xkd_ray.config.schema import load_config
config = load_config(sys.argv[1], {"distill.method": "e2kd", "explain.explainer": "saliency"})
heavy = sorted(name for name in ("torch", "captum", "torchvision", "ray") if name in sys.modules)
print(json.dumps({"heavy": heavy, "method": config.distill.method}))
"""


def test_loading_a_yaml_config_imports_no_torch_captum_or_ray(tmp_path):
    """The registries validation reads are torch-free leaves; the implementations load on first use."""
    config = tmp_path / "experiment.yaml"
    config.write_text("data:\n  dataset: digits\nstudent:\n  fusion: gate\nteacher:\n  arch: resnet18\n")
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, cwd=REPO, timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"heavy": [], "method": "e2kd"}


def test_an_entry_added_after_import_is_a_valid_choice():
    """Choices are looked up at validation time, not frozen into the schema at import."""
    from xkd_ray.config.registries import FUSIONS
    from xkd_ray.config.schema import ExperimentConfig
    from xkd_ray.errors import XKDConfigError

    try:
        ExperimentConfig.from_dict({"student": {"fusion": "late"}})
        raise AssertionError("an unknown fusion was accepted")
    except XKDConfigError as exc:
        assert str(exc) == "student.fusion: got 'late'; allowed values are concat, gate"
    FUSIONS["late"] = "test-only entry"
    try:
        assert ExperimentConfig.from_dict({"student": {"fusion": "late"}}).student.fusion == "late"
    finally:
        del FUSIONS["late"]
