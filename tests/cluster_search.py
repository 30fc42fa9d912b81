"""A search on a simulated multi-node Ray cluster that loses a worker node mid-trial.

Run by ``tests/test_cluster.py`` as a subprocess (the pytest process has its own local Ray):

    python tests/cluster_search.py --space SPACE --out EXPERIMENT [--timeout SECONDS]

It starts ``ray.cluster_utils.Cluster`` on this machine: a head with no CPUs (the search's
driver runs there, so no trial can) and two worker nodes of one CPU each, so every trial's
driver (0.1 CPU) and its Ray Train worker (0.9 CPU) run on a worker node and either node can
hold a whole trial alone. It then runs the real search job (``xkd_ray/search.py --address``)
as a subprocess, waits until one trial has finished and the next one has a checkpoint that
Tune (a one-worker trial trained in its driver, the default) or Ray Train has registered, kills
the worker node that trains it (SIGKILL, as a crashed or preempted machine), waits for the
search to end and prints one JSON summary as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2: the run's registered checkpoints
# A killed raylet is noticed through GCS health checks: every second, dead after 3 misses
# (defaults: 3 s and 5 misses), so the test does not wait ~15 s for Ray to notice the loss.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


TARGETS = {"train_worker": "RayTrainWorker", "trial_driver": "ImplicitFunc"}  # actor class names


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Experiment:
    """Reads the search's storage: a folder, or ``s3://bucket/prefix`` (xkd_ray.pareto.storage)."""

    def __init__(self, out: str) -> None:
        from xkd_ray.pareto.storage import is_remote, open_storage

        self.storage = open_storage(out, check=False) if is_remote(out) else None
        self.folder = None if self.storage else Path(out).resolve()

    def run_snapshots(self) -> dict[str, bytes | None]:
        """trial id -> its Ray Train run's checkpoint snapshot (None while it has none)."""
        if self.storage is None:
            folders = sorted((self.folder / "train").glob("trial-*"))
            found = {f.name: (f / SNAPSHOT).read_bytes() if (f / SNAPSHOT).exists() else None for f in folders}
        else:
            files = self.storage.files("train")
            runs = sorted({path.split("/")[1] for path in files if path.count("/") >= 2})
            found = {
                run: self.storage.read_bytes("train", run, SNAPSHOT) if f"train/{run}/{SNAPSHOT}" in files else None
                for run in runs
                if run.startswith("trial-")
            }
        return {run.removeprefix("trial-"): payload for run, payload in found.items()}

    def trial_results(self) -> dict[str, bytes]:
        """trial id -> Tune's ``result.json`` of the trial (the results Tune has processed)."""
        prefix = "trial_driver_"
        if self.storage is None:
            folders = sorted((self.folder / "tune").glob(f"{prefix}*"))
            found = {f.name: (f / "result.json").read_bytes() for f in folders if (f / "result.json").exists()}
        else:
            files = self.storage.files("tune")
            found = {
                path.split("/")[1]: self.storage.read_bytes(path)
                for path in files
                if path.count("/") == 2 and path.endswith("/result.json") and path.split("/")[1].startswith(prefix)
            }
        return {name.removeprefix(prefix).split("_")[0]: payload for name, payload in found.items()}

    def finished(self) -> dict[str, dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from xkd_ray.pareto.front import read_trials

        if self.storage is None:
            return {row["trial_id"]: row for row in read_trials(self.folder)}
        if not self.storage.exists("trials.parquet"):
            return {}
        table = pq.read_table(pa.BufferReader(self.storage.read_bytes("trials.parquet")))
        return {row["trial_id"]: row for row in table.to_pylist()}


def _forget_bootstrap_file(address: str) -> None:
    """Remove the "latest cluster" file ``cluster_utils`` wrote for ``address`` (Ray's default temp
    folder), so no other Ray process on this machine autodetects this cluster as its own."""
    bootstrap = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if bootstrap.exists() and bootstrap.read_text().strip() == address:
        bootstrap.unlink()


def _registered_checkpoint(payload: bytes | None) -> dict[str, Any] | None:
    """The run's latest checkpoint (its folder name and epoch) once Ray Train's controller has
    registered it (a checkpoint folder alone may be a report the controller has not collected yet)."""
    try:
        snapshot = json.loads(payload or b"")
    except ValueError:
        return None
    latest = snapshot.get("latest_checkpoint_result")
    if not latest:
        return None
    return {"checkpoint": latest["checkpoint_dir_name"], "checkpoint_epoch": latest["metrics"]["epoch"]}


def _tune_checkpoint(payload: bytes) -> dict[str, Any] | None:
    """A trial's latest checkpoint that Tune has processed (a result line naming it), when the
    trial trains in its driver."""
    latest = None
    for line in payload.decode(errors="replace").splitlines():
        try:
            result = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if result.get("checkpoint_dir_name") and "epoch" in result:
            latest = {"checkpoint": result["checkpoint_dir_name"], "checkpoint_epoch": result["epoch"]}
    return latest


def _alive_actors(cluster: Any) -> list[dict[str, Any]]:
    table = cluster.global_state.actor_table(None)
    return [
        {"class": info["ActorClassName"], "node_id": info["Address"]["NodeID"], "start": info["StartTime"]}
        for info in table.values()
        if info["State"] == "ALIVE"
    ]


def _find_target(
    cluster: Any, experiment: Experiment, finished: set[str], actor_class: str, last_epoch: int
) -> dict[str, Any] | None:
    """An unfinished trial with a registered checkpoint of an epoch up to ``last_epoch`` (so
    training is left to resume) and the worker node that runs its ``actor_class`` actor (its
    Ray Train worker, or its Tune driver)."""
    in_driver = actor_class == TARGETS["trial_driver"]
    found = experiment.trial_results() if in_driver else experiment.run_snapshots()
    for trial_id, payload in found.items():
        checkpoint = _tune_checkpoint(payload) if in_driver else _registered_checkpoint(payload)
        if trial_id in finished or checkpoint is None or checkpoint["checkpoint_epoch"] > last_epoch:
            continue
        workers = sorted((a for a in _alive_actors(cluster) if a["class"] == actor_class), key=lambda a: a["start"])
        nodes = {node.node_id: node for node in cluster.worker_nodes}
        if workers and workers[-1]["node_id"] in nodes:
            return {"trial_id": trial_id, **checkpoint, "node": nodes[workers[-1]["node_id"]]}
    return None


def _remove_training_node(
    cluster: Any, experiment: Experiment, actor_class: str, last_epoch: int
) -> dict[str, Any] | None:
    """Once a trial has finished, kill (SIGKILL, no graceful shutdown) the node of the next
    trial to have a checkpoint; returns what was removed and the trials finished before."""
    finished = experiment.finished()
    target = _find_target(cluster, experiment, set(finished), actor_class, last_epoch) if finished else None
    if target is None:
        return None
    node = target.pop("node")
    on_node = sorted(a["class"] for a in _alive_actors(cluster) if a["node_id"] == node.node_id)
    cluster.remove_node(node, allow_graceful=False)
    print(f"removed node {node.node_id} while it trained trial {target['trial_id']}: {on_node}", flush=True)
    return {**target, "node_id": node.node_id, "actors_on_node": on_node, "finished_before": finished}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, required=True)
    parser.add_argument("--out", required=True, help="experiment folder or s3://bucket/prefix")
    parser.add_argument("--log", type=Path, help="the search's output (default: <out>.search.log)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole search")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument(
        "--target",
        choices=sorted(TARGETS),
        default="train_worker",
        help="with Ray Train trials: remove the node of the trial's Ray Train worker (default) or of its Tune driver",
    )
    args = parser.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from xkd_ray.cluster.ray_trial import trains_in_driver
    from xkd_ray.config.space import load_search_space

    spec = load_search_space(args.space)
    epochs = spec.base.distill.epochs
    # A trial trained in its driver trains in the Tune driver's process: that is the node to lose.
    target = TARGETS["trial_driver"] if trains_in_driver(spec) else TARGETS[args.target]
    last_epoch = epochs - 3  # at least two epochs left to train after the node is lost

    started = time.monotonic()
    experiment = Experiment(args.out)
    summary: dict[str, Any] = {"removed": None}
    # The head's fixed default ports may be held by another Ray on this machine (the test
    # session's local Ray): give it free ones. The dashboard runs, as on a real cluster: Ray
    # Train's PlacementGroupCleaner asks the state API (served by the dashboard) whether a
    # trial's Train controller died with its node, and only then frees the workers' placement
    # group; without it the retried trial would wait for CPUs forever.
    # This cluster's own processes find it through RAY_ADDRESS (its GCS port chosen here), and it
    # leaves no /tmp/ray/ray_current_cluster behind (cluster_utils writes one): Ray Train's
    # PlacementGroupCleaner finds "its" cluster's state API by autodetection, which reads that
    # file, so a Ray Train run on any other Ray of this machine (the pytest workers' session Rays)
    # asked this cluster whether its controller was alive, was told no, and had its workers'
    # placement group removed mid-run ("Destroying worker since its placement group was
    # removed", seen in two suite runs); and a `ray.init()` without an address would join it.
    gcs_port = _free_port()
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "gcs_server_port": gcs_port,
            "num_cpus": 0,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port(),
            "dashboard_agent_listen_port": _free_port(),
            "_system_config": SYSTEM_CONFIG,
        },
    )
    assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
    _forget_bootstrap_file(cluster.address)
    workers = [cluster.add_node(num_cpus=args.cpus_per_node) for _ in range(2)]
    cluster.wait_for_nodes()
    roles = {cluster.head_node.node_id: "head", **{node.node_id: f"worker{i}" for i, node in enumerate(workers)}}
    summary["cluster_seconds"] = round(time.monotonic() - started, 1)
    summary["roles"] = roles
    log_path = args.log or Path(f"{args.out}.search.log")
    command = [sys.executable, str(REPO / "xkd_ray" / "search.py"), "--space", str(args.space)]
    command += ["--out", args.out, "--no-live", "--address", cluster.address]
    search = None
    try:
        with open(log_path, "w") as log:
            search = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            while search.poll() is None and time.monotonic() < started + args.timeout:
                if summary["removed"] is None:
                    summary["removed"] = _remove_training_node(cluster, experiment, target, last_epoch)
                    if summary["removed"] is not None:
                        summary["removed"].update(node=roles[summary["removed"].pop("node_id")])
                        summary["removed"]["at_seconds"] = round(time.monotonic() - started, 1)
                time.sleep(0.25)
            summary["timed_out"] = search.poll() is None
    finally:
        if search is not None:
            if search.poll() is None:
                os.killpg(search.pid, signal.SIGKILL)
            summary["returncode"] = search.wait()
        summary["search_seconds"] = round(time.monotonic() - started, 1)
        summary["log"] = str(log_path)
        cluster.shutdown()
        summary["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
