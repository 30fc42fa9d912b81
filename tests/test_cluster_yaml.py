"""The cluster launcher files validate against the JSON schema Ray ships, and say what we need."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", ["cluster.yaml", "local.yaml"])
def test_cluster_files_validate_against_rays_schema(name):
    raw = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(raw, SCHEMA)
    jsonschema.validate(prepare_config(copy.deepcopy(raw)), SCHEMA)  # with Ray's defaults filled in
    assert any("pip install" in c and "xkd-ray" in c for c in raw["setup_commands"])
    assert raw["file_mounts"] == {"~/xkd-ray": "."}
    assert any("--dashboard-host" in c for c in raw["head_start_ray_commands"])


def test_aws_cluster_has_autoscaling_gpu_workers():
    raw = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    workers = raw["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1
    assert workers["min_workers"] < workers["max_workers"]
    assert raw["available_node_types"][raw["head_node_type"]]["resources"].get("GPU", 0) == 0


def test_schema_catches_an_unknown_key():
    raw = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    raw["worker_nodes_typo"] = 1
    with pytest.raises(jsonschema.ValidationError, match="worker_nodes_typo"):
        jsonschema.validate(raw, SCHEMA)
