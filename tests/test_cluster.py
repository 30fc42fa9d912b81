"""The whole pipeline on a simulated multi-node cluster (``ray.cluster_utils.Cluster``: a head
with no CPUs and two worker nodes on this machine) with ``--out s3://`` on a local S3 server: the
teacher is trained by Ray Train and explained by Ray actors on the worker nodes, a worker node is
killed while it trains a trial, the search finishes that trial on the remaining node from its last
checkpoint, and the front loads from s3 in a fresh process.

The cluster lives in a subprocess (``tests/cluster_search.py``), never in the pytest process,
which may hold the session's local Ray (``ray_local``). A one-worker trial trains in its Tune
driver (the default), so the lost node holds the whole trial: Tune retries it on the other node
(``search.max_failures``) from its last checkpoint on s3. With ``search.one_worker_in_driver:
false`` Ray places the trial's Tune driver and Train controller on either worker node, and the
lost node holds the Train worker alone (Ray Train restarts its worker group) or the whole trial;
all end the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import OWN_CLUSTER, REPO, smoke_space
from xkd_ray.pareto.front import front_rows, read_trials
from xkd_ray.pareto.storage import Storage

TRIALS = 2  # the first finishes, the node is lost while the second trains
EPOCHS = 20  # time to lose the node after a checkpoint, with epochs left to resume (~0.3 s each)

LOAD_FRONT_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import ray
    from xkd_ray.config.schema import ExperimentConfig
    from xkd_ray.data.datasets import load_splits
    from xkd_ray.pareto.front import load_pareto_student
    experiment = sys.argv[1]
    loaded = {}
    for prefer in ("knee", "accuracy", "fidelity"):
        student = load_pareto_student(experiment, prefer=prefer)
        config = ExperimentConfig.from_dict(student.config["experiment"])
        maps = student.explain(load_splits(config.data).test.images[:2])
        assert maps.shape == (2, config.data.image_size, config.data.image_size), maps.shape
        loaded[prefer] = student.path.name
    print(json.dumps({"loaded": loaded, "ray_initialized": ray.is_initialized()}))
    """
)


def _run_on_cluster(tmp_path: Path, cache_dir: str, out: str) -> dict:
    space = smoke_space(tmp_path, cache_dir, trials=TRIALS, max_concurrent_trials=1)
    raw = yaml.safe_load(space.read_text())
    raw["base"]["distill"]["epochs"] = EPOCHS
    space.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}  # as users run
    env.pop("XKD_FAULTS", None)  # this test's fault is the lost node, nothing injected
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, str(REPO / "tests" / "cluster_search.py"), "--space", str(space)]
    command += ["--out", out, "--log", str(tmp_path / "search.log"), "--timeout", "480"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(lines[-1])
    log = Path(summary["log"]).read_text()[-4000:] if Path(summary["log"]).exists() else ""
    assert summary["returncode"] == 0 and not summary["timed_out"], f"{summary}\n{log}"
    assert summary["removed"] is not None, f"no trial was caught training with a checkpoint: {summary}\n{log}"
    return summary


def _uninterrupted(config_json: str) -> dict:
    """The same trial config trained start to end by the plain loop in this process. A one-worker
    Ray Train run and a trial trained in its driver run the same loop on the same batches and end
    bit-identical to it (tests/test_train.py checks that equality), so no Ray is needed here."""
    from xkd_ray.config.schema import ExperimentConfig
    from xkd_ray.core.distill import distill
    from xkd_ray.core.prepared import prepare

    config = ExperimentConfig.from_dict(json.loads(config_json))
    return distill(config, prepare(config, progress=False), progress=False)[1]["val"]


@pytest.mark.slow
@OWN_CLUSTER
def test_losing_a_worker_node_mid_trial_resumes_it_from_its_checkpoint(tmp_path, s3_server):
    url = "s3://xkd/cluster"
    fresh_cache = tmp_path / "cache"  # no teacher yet: the search trains and explains it on the workers
    summary = _run_on_cluster(tmp_path, str(fresh_cache), url)
    storage = Storage(url=url, filesystem=s3_server, root="xkd/cluster")
    experiment = tmp_path / "copy"  # everything but Tune's and Train's own state, read back from s3
    storage.download(experiment, skip=("tune", "train"))
    removed = summary["removed"]
    print(
        f"cluster run: {summary['seconds']} s (cluster up in {summary['cluster_seconds']} s); removed "
        f"{removed['node']} at {removed['at_seconds']} s after epoch {removed['checkpoint_epoch']} of trial "
        f"{removed['trial_id']}, with {removed['actors_on_node']}"
    )
    rows = {row["trial_id"]: row for row in read_trials(experiment)}
    workers = {node for node, role in summary["roles"].items() if role != "head"}

    # The teacher was trained by Ray Train, and its explanations computed, on worker nodes only;
    # both are cached on storage for the next search.
    (teacher_config,) = [p for p in storage.files("cache/teachers") if p.endswith("/config.json")]
    training = json.loads(storage.read_bytes(teacher_config))["training"]
    assert training["backend"] == "ray_train" and set(training["node_ids"]) <= workers, training
    explanations = storage.files("cache/explanations")
    assert len(explanations) == 3
    for path in explanations:
        metadata = pq.read_schema(pa.BufferReader(storage.read_bytes(path))).metadata[b"xkd_ray"]
        computed_on = json.loads(metadata)["computed_on"]
        assert computed_on["backend"] == "ray_actors" and set(computed_on["node_ids"]) <= workers, computed_on
    # Every trial's driver and Train workers ran on worker nodes; the interrupted one on both.
    for row in rows.values():
        nodes = json.loads(row["nodes"])
        assert nodes["driver"] in workers and set(nodes["workers"]) <= workers, nodes

    # Every trial finished ok; the interrupted one resumed from a checkpoint, no other restarted.
    assert len(rows) == TRIALS and {row["status"] for row in rows.values()} == {"ok"}, rows
    interrupted = rows[removed["trial_id"]]
    assert interrupted["resumed_from_checkpoint"] >= 1
    assert set(json.loads(interrupted["nodes"])["workers"]) == workers  # the lost node, then the other
    assert all(row["resumed_from_checkpoint"] == 0 for key, row in rows.items() if key != removed["trial_id"])
    # Resumed, not retrained: the model, optimizer, scheduler and RNG state came back, so the
    # result is exactly that of an uninterrupted run.
    reference = _uninterrupted(interrupted["config"])
    assert (interrupted["val_accuracy"], interrupted["val_fidelity"]) == (reference["accuracy"], reference["fidelity"])

    # Nothing finished before the loss is lost or changed, and its student is still there.
    assert removed["finished_before"], "the node was lost before any trial had finished"
    for trial_id, before in removed["finished_before"].items():
        after = rows[trial_id]
        for key in ("status", "val_accuracy", "val_fidelity", "student_dir"):
            assert after[key] == before[key], (trial_id, key)
        assert (experiment / "students" / trial_id).is_dir()

    # The front is still the non-dominated set of the ok trials, folders and table alike.
    front = {row["trial_id"] for row in front_rows(list(rows.values()))}
    listed = {row["trial_id"] for row in pq.read_table(experiment / "pareto" / "front.parquet").to_pylist()}
    assert listed == front
    assert {p.name for p in (experiment / "pareto").iterdir() if p.is_dir()} == front
    assert json.loads((experiment / "summary.json").read_text())["trials"] == TRIALS

    # Its students load from s3 without Ray in a fresh process.
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_FRONT_IN_FRESH_PROCESS, url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["ray_initialized"] is False
    assert set(result["loaded"].values()) <= front
