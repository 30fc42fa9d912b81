"""``--out s3://bucket/prefix`` against a real S3-compatible server process (moto's server mode on
127.0.0.1, started by the suite): bad endpoints, credentials, buckets and prefixes refused before
any trial; a search that writes there, resumes there, and whose student loads in a fresh process."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import (
    REPO,
    _free_port,
    held_trial_points,
    injected_faults,
    seed_session_teacher,
    smoke_space,
    start_s3_server,
    wait_for,
)
from xkd_ray.errors import XKDConfigError
from xkd_ray.pareto.experiment_folder import MANIFEST
from xkd_ray.pareto.front import front_rows, read_objectives
from xkd_ray.pareto.snapshot import registry_snapshot
from xkd_ray.pareto.storage import Storage, open_storage, staging_folder
from xkd_ray.search import main as search_main


def _files_holding(folder: Path, text: str) -> dict[str, int]:
    """How many times ``text`` occurs in each regular file under ``folder`` (read whole, as bytes)."""
    needle = text.encode()
    counts = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            found = path.read_bytes().count(needle)
            if found:
                counts[str(path.relative_to(folder))] = found
    return counts


def _refused(capsys, space, url: str) -> str:
    """Run `xkd search` on ``url``; it must exit 2 with exactly one error line, before any Ray work."""
    assert search_main(["--space", str(space), "--out", url, "--no-live"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert not staging_folder(url).exists() or not any(staging_folder(url).iterdir())
    return error


def _objects(filesystem: pafs.FileSystem, prefix: str) -> list[str]:
    if filesystem.get_file_info(prefix).type == pafs.FileType.NotFound:
        return []
    found = filesystem.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return sorted(info.path for info in found if info.type == pafs.FileType.File)


def test_unreachable_endpoint_missing_bucket_and_bad_names_are_refused(s3_server, tmp_path, cache_dir, capsys):
    space = smoke_space(tmp_path, cache_dir)
    assert "the bucket 'no-such-bucket' does not exist" in _refused(capsys, space, "s3://no-such-bucket/run")
    assert "not a valid S3 bucket name" in _refused(capsys, space, "s3://Bad_Bucket/run")
    assert "give a prefix inside the bucket" in _refused(capsys, space, "s3://xkd")
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    env = {**os.environ, "AWS_ENDPOINT_URL": closed}
    run = subprocess.run(
        [sys.executable, str(REPO / "xkd_ray" / "search.py"), "--space", str(space), "--out", "s3://xkd/x"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0
    assert f"cannot reach the S3 endpoint {closed}" in run.stderr
    assert _objects(s3_server, "xkd/x") == []  # nothing half-written on storage


def test_credentials_the_server_refuses_are_refused(tmp_path, cache_dir, monkeypatch):
    """A second server that checks signatures (moto's IAM mode): a made-up key and a wrong secret for
    a real key are both refused in one line; the real key works."""
    port = _free_port()
    server = start_s3_server(port, {"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="xkd")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="xkd", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="xkd")["AccessKey"]
        good = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id=good["AWS_ACCESS_KEY_ID"], aws_secret_access_key=good["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket="locked")  # fmt: skip
        for name, value in good.items():  # the AWS SDK reads credentials from the process environment
            monkeypatch.setenv(name, value)
        assert open_storage("s3://locked/run").url == "s3://locked/run"
        for name, wrong in (("AWS_ACCESS_KEY_ID", "AKIAMADEUP0000000000"), ("AWS_SECRET_ACCESS_KEY", "not-it")):
            monkeypatch.setenv(name, wrong)
            with pytest.raises(XKDConfigError) as refused:
                open_storage("s3://locked/run")
            assert "refused the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)" in str(refused.value)
            monkeypatch.setenv(name, good[name])
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_prefix_holding_other_files_or_another_search_is_refused(s3_server, tmp_path, cache_dir, capsys):
    space = smoke_space(tmp_path, cache_dir)
    with s3_server.open_output_stream("xkd/not-a-search/notes.txt") as stream:
        stream.write(b"someone else's")
    error = _refused(capsys, space, "s3://xkd/not-a-search")
    assert "holds 1 files that are not an xkd search (no experiment.json), e.g. notes.txt" in error
    # A prefix with another search's manifest: refused without --resume, and with --resume for another space.
    storage = open_storage("s3://xkd/other-search")
    staging = staging_folder(storage.url)
    staging.mkdir(parents=True, exist_ok=True)
    from xkd_ray.config.space import load_search_space
    from xkd_ray.pareto.experiment_folder import FolderLock, open_experiment

    with FolderLock(staging) as lock:
        open_experiment(staging, load_search_space(space), resume=False, allow_space_change=False, trust=False)
        lock.claim()
    storage.upload(staging / MANIFEST, MANIFEST)
    assert "already holds a search; pass --resume" in _refused_after_download(capsys, space, storage.url, [])
    other = yaml.safe_load(space.read_text())
    other["base"]["distill"]["epochs"] = 1
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(other))
    error = _refused_after_download(capsys, changed, storage.url, ["--resume"])
    assert "space differs" in error and "base.distill.epochs" in error
    assert _objects(s3_server, "xkd/other-search") == ["xkd/other-search/experiment.json"]


def _refused_after_download(capsys, space, url: str, extra: list[str]) -> str:
    assert search_main(["--space", str(space), "--out", url, "--no-live", *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


@pytest.mark.slow
def test_a_search_writes_resumes_and_loads_from_object_storage(
    s3_server, ray_local, cache_dir, tiny_data, tmp_path, capsys
):
    """A search on s3 interrupted after its first trial, resumed from another staging folder (as on
    another machine) to its 3 trials: Tune's state, Train's checkpoints, the registry and the teacher /
    explanation cache are all on storage; the knee student loads from s3 in a fresh process. Ctrl-C
    comes while the second trial is held (a ``hold`` fault): exactly one trial finished before it.
    The interrupted search joins the session's Ray as a job of its own (one Ray start less).

    Its driver holds a random secret in ``AWS_SECRET_ACCESS_KEY``, and no file under that Ray's
    session folder (``logs/`` and all) may contain it: Ray Tune used to copy the driver's AWS
    credentials into each trial actor's runtime env, and ``runtime_env_agent.log`` (mode 0644) held
    the secret 6 times for one trial. The session's Ray was started with the suite's own credentials,
    which its workers inherit; moto takes any secret, so only the driver's is looked for."""
    secret = f"xkd-secret-{secrets.token_hex(16)}"
    points, rules = held_trial_points(tmp_path / "holding")
    seed_session_teacher(cache_dir, tiny_data.teacher_id, tmp_path / "cache")  # pushed to s3 by the search
    space = smoke_space(tmp_path, str(tmp_path / "cache"), trials=3, max_concurrent_trials=1, initial_points=points)
    url = "s3://xkd/search-1"
    storage = Storage(url=url, filesystem=s3_server, root="xkd/search-1")
    log = open(tmp_path / "search.log", "w")
    address = ray_local.get_runtime_context().gcs_address
    with injected_faults(rules):
        search = subprocess.Popen(
            [sys.executable, str(REPO / "xkd_ray" / "search.py"), "--space", str(space), "--out", url, "--no-live",
             "--address", address],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "AWS_SECRET_ACCESS_KEY": secret},
        )  # fmt: skip
        try:
            held = (tmp_path / "holding").exists
            wait_for(lambda: held() and storage.exists("summary.json"), 600, "one trial and the second held", search)
            search.send_signal(signal.SIGINT)
            code = search.wait(timeout=300)
        finally:
            if search.poll() is None:
                os.killpg(search.pid, signal.SIGKILL)
            log.close()
    output = (tmp_path / "search.log").read_text()
    assert code == 130, output[-3000:]
    objects = storage.files()
    for expected in ("experiment.json", "trials.parquet", "summary.json", "optuna.journal", "pareto/front.parquet"):
        assert expected in objects, objects
    for folder in ("tune/", "students/", "cache/explanations/", "cache/teachers/teacher-"):
        assert any(p.startswith(folder) for p in objects), (folder, objects)
    # The trials' checkpoints (trained in their Tune drivers: Tune's trial folders) are on s3 too.
    assert any(p.startswith("tune/trial_driver_") and "/checkpoint_" in p for p in objects), objects
    before = len(pq.read_table(s3_server.open_input_file(storage.path("trials.parquet"))))
    assert before == 1
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    assert (session / "logs" / "runtime_env_agent.log").stat().st_size > 0  # the log the secret went to
    assert _files_holding(session, secret) == {}

    shutil.rmtree(staging_folder(url))
    assert search_main(["--space", str(space), "--out", url, "--no-live", "--resume"]) == 0
    assert f"knee student: {url}/pareto/" in capsys.readouterr().out
    trials = pq.read_table(s3_server.open_input_file(storage.path("trials.parquet"))).to_pylist()
    assert sorted(row["trial_id"] for row in trials) == sorted({row["trial_id"] for row in trials})  # once each
    assert len(trials) == 3
    snapshot = registry_snapshot(url)
    summary = json.loads(snapshot.joinpath("summary.json").read_text())
    assert summary["trials"] == 3
    front = {row["trial_id"] for row in pq.read_table(snapshot / "pareto" / "front.parquet").to_pylist()}
    assert front == {row["trial_id"] for row in front_rows(trials, read_objectives(snapshot))}

    # A fresh process with no staging folder and no Ray loads the knee student from s3 and runs it.
    shutil.rmtree(staging_folder(url))
    code = (
        "import torch, sys; from xkd_ray.pareto.front import load_pareto_student; "
        f"s = load_pareto_student({url!r}); x = torch.zeros(2, 1, 16, 16); "
        "print('logits', tuple(s.model(x).shape)); assert 'ray' not in sys.modules"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert "logits (2, 10)" in loaded.stdout
    # `xkd pareto s3://...` prints the same front.
    shown = subprocess.run([sys.executable, "-m", "xkd_ray.ui.cli", "pareto", url], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert f"hypervolume {summary['hypervolume']:.4f} after 3 trials" in " ".join(shown.stdout.split())
