"""The cluster launcher files pass the checks `ray up` makes before it touches a cloud, and say
what xkd-ray needs: the package and the auth token on every node, a dashboard, GPU workers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
FILES = ["cluster.yaml", "local.yaml"]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def launcher_config(raw: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does first (ray.autoscaler._private.commands._bootstrap_config): fill in Ray's
    defaults, then validate against ray/autoscaler/ray-schema.json plus Ray's own checks."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def start_command(commands: list[str]) -> str:
    (start,) = [c for c in commands if "ray start" in c]
    return start


@pytest.mark.parametrize("name", FILES)
def test_cluster_file_passes_rays_validation(name):
    config = launcher_config(load(name))
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("name", FILES)
def test_every_node_gets_the_package_and_the_auth_token(name):
    raw = load(name)
    assert raw["file_mounts"]["~/xkd-ray"] == "."
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in raw["rsync_filter"]  # the local .venv is not copied to the nodes
    assert any("pip install" in c and "-e ~/xkd-ray" in c for c in raw["setup_commands"])

    head = start_command(raw["head_start_ray_commands"])
    worker = start_command(raw["worker_start_ray_commands"])
    assert "--head" in head and "--port=6379" in head and "--dashboard-host=0.0.0.0" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert head.startswith("RAY_AUTH_MODE=token ") and worker.startswith("RAY_AUTH_MODE=token ")


def test_aws_cluster_has_a_cpu_head_and_autoscaling_gpu_workers():
    config = launcher_config(load("cluster.yaml"))
    assert config["cluster_name"] == "xkd-ray"
    assert (config["provider"]["type"], config["provider"]["region"]) == ("aws", "us-west-2")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] >= 1 and head["resources"].get("GPU", 0) == 0
    assert "REPLACE" in head["node_config"]["ImageId"]
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]


def test_local_cluster_leaves_node_types_to_ray():
    raw = load("local.yaml")
    assert raw["provider"]["type"] == "local"
    assert "available_node_types" not in raw and "head_node_type" not in raw
    config = launcher_config(raw)
    (node_type,) = config["available_node_types"].values()
    assert node_type["max_workers"] == len(raw["provider"]["worker_ips"])


def test_validation_rejects_an_unknown_top_level_key():
    raw = load("cluster.yaml")
    raw["worker_nodes_typo"] = 1
    with pytest.raises(jsonschema.ValidationError, match="worker_nodes_typo"):
        launcher_config(raw)


def test_validation_rejects_a_local_config_that_declares_its_node_type():
    """Why local.yaml has no available_node_types: Ray then skips its defaults and refuses it."""
    raw = load("local.yaml")
    raw["available_node_types"] = {"local.cluster.node": {"node_config": {}, "resources": {}}}
    raw["head_node_type"] = "local.cluster.node"
    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        launcher_config(raw)
