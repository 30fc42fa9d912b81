"""The search end to end on a local Ray: trials, the Pareto registry, loading without Ray, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.conftest import (
    REPO,
    SMOKE,
    SMOKE_SEARCH,
    digits_image_folder,
    held_trial_points,
    injected_faults,
    plain_torch_resnet18,
    smoke_space,
    wait_for,
)
from tests.registry_plugin import PLUGIN_METHOD
from xkd_ray.config.space import parse_search_space
from xkd_ray.core.metrics import non_dominated
from xkd_ray.errors import XKDConfigError
from xkd_ray.pareto.front import front_rows, read_trials
from xkd_ray.search import main as search_main


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"space": {"distill.temprature": {"uniform": [1, 2]}}}, "space.distill.temprature: unknown key"),
        ({"space": {"distill.alpha": {"uniform": [0.5, 0.5]}}}, "space.distill.alpha: empty range"),
        ({"space": {"student.fusion": {"choice": "concat"}}}, "space.student.fusion: choice must be a list"),
        ({"space": {"student.ae_depth": {"choice": [1, 5]}}}, "space.student.ae_depth: value 5 is not valid"),
        ({"space": {"distill.beta": {"loguniform": [0, 1]}}}, "space.distill.beta: loguniform needs low > 0"),
        ({"space": {"distill.alpha": 0.5}, "searh": {}}, "searh: unknown section"),
        (
            {"space": {"distill.alpha": {"uniform": [0, 1]}}, "search": {"initial_points": [{"distill.beta": 1}]}},
            "search.initial_points[0].distill.beta: not a searched key",
        ),
        (
            {"space": {"distill.alpha": {"uniform": [0, 0.5]}}, "search": {"initial_points": [{"distill.alpha": 0.9}]}},
            "search.initial_points[0].distill.alpha: 0.9 is outside [0, 0.5]",
        ),
        (
            {
                "space": {"student.fusion": {"choice": ["concat"]}},
                "search": {"initial_points": [{"student.fusion": "x"}]},
            },
            "search.initial_points[0].student.fusion: 'x' is not one of ['concat']",
        ),
        ({"space": {"distill.alpha": 0.5}, "search": {"trials": 1, "initial_points": [{}, {}]}}, "2 points but"),
    ],
)
def test_bad_search_spaces_name_the_key(space, expected):
    with pytest.raises(XKDConfigError, match=re.escape(expected)):
        parse_search_space(space)


def test_bad_space_is_refused_before_ray_starts(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  distill.alpha: {uniform: [1, 0]}\n")
    out = tmp_path / "experiment"
    assert search_main(["--space", str(bad), "--out", str(out)]) == 2
    assert "space.distill.alpha: empty range" in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_experiment_folder_is_refused_before_any_trial(tmp_path, capsys):
    """A folder that cannot be created (its parent is a file; the same path as a full disk or a
    read-only mount: an OSError on the first write) stops the search before Ray starts."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the experiment folder's parent should be")
    assert search_main(["--space", str(SMOKE), "--out", str(blocker / "exp")]) == 2
    error = capsys.readouterr().err
    assert "cannot write the experiment folder" in error and "not-a-folder" in error


LOAD_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    from xkd_ray.pareto.front import list_pareto_students, load_pareto_student
    from xkd_ray.config.schema import ExperimentConfig
    from xkd_ray.data.datasets import load_splits
    from xkd_ray.core.metrics import accuracy
    import ray
    experiment = sys.argv[1]
    rows = list_pareto_students(experiment).to_pylist()
    out = {}
    for prefer in ("knee", "accuracy", "fidelity", {"accuracy": 1.0, "fidelity": 1.0}):
        student = load_pareto_student(experiment, prefer=prefer)
        assert not student.model.training
        config = ExperimentConfig.from_dict(student.config["experiment"])
        test = load_splits(config.data).test
        maps = student.explain(test.images[:4])
        assert maps.shape == (4, config.data.image_size, config.data.image_size)
        out[str(prefer)] = {
            "path": str(student.path),
            "recomputed": accuracy(student.model(test.images), test.labels),
            "stored": student.metrics["test"]["accuracy"],
        }
    out["ray_initialized"] = ray.is_initialized()
    print(json.dumps(out))
    """
)


@SMOKE_SEARCH
def test_smoke_search_fills_a_consistent_registry(smoke_experiment):
    experiment, summary = smoke_experiment.experiment, smoke_experiment.summary
    rows = read_trials(experiment)
    assert len(rows) >= 4 and sum(r["status"] == "ok" for r in rows) >= 4
    front = pq.read_table(experiment / "pareto" / "front.parquet").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    points = [(r["val_accuracy"], r["val_fidelity"]) for r in ok]
    expected = {ok[i]["trial_id"] for i in non_dominated(points)}
    assert {r["trial_id"] for r in front} == expected
    folders = {p.name for p in (experiment / "pareto").iterdir() if p.is_dir()}
    assert folders == expected
    assert summary["front_size"] == len(expected) and summary["hypervolume"] > 0
    assert json.loads((experiment / "summary.json").read_text())["trials"] == len(rows)
    assert {r["method"] for r in rows} <= {"kd", "xd", PLUGIN_METHOD}


@SMOKE_SEARCH
def test_teacher_explainer_ran_once_for_the_whole_search(smoke_experiment):
    summary, writes, cache = smoke_experiment.summary, smoke_experiment.explanation_writes, smoke_experiment.cache
    assert len(writes) == 3  # train, val, test: computed once, before any trial
    assert len(list((cache / "explanations").glob("*.parquet"))) == 3
    assert summary["explanations_from_cache"] == {"train": False, "val": False, "test": False}


@SMOKE_SEARCH
def test_front_students_load_without_ray_in_a_fresh_process(smoke_experiment):
    experiment = smoke_experiment.experiment
    result = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(experiment)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded.pop("ray_initialized") is False
    for entry in loaded.values():
        assert entry["recomputed"] == pytest.approx(entry["stored"], abs=1e-9)


def _user_teacher(folder: Path) -> tuple[Path, float]:
    """A resnet18 trained in plain torch on the smoke space's digits (16 px, grey repeated to 3
    channels); its state_dict file and its test accuracy as plain torch measures it."""
    import torch

    from xkd_ray.config.schema import DataConfig
    from xkd_ray.data.datasets import load_splits

    splits = load_splits(DataConfig(dataset="digits", image_size=16))
    model = plain_torch_resnet18(splits.train.images.repeat(1, 3, 1, 1), splits.train.labels)
    with torch.no_grad():
        predicted = model(splits.test.images.repeat(1, 3, 1, 1)).argmax(1)
    folder.mkdir()
    torch.save(model.state_dict(), folder / "resnet18.pt")
    return folder / "resnet18.pt", float((predicted == splits.test.labels).float().mean())


def _killed_while_held(command: list[str], rules: list[dict], address: str, tmp_path: Path, finished: int) -> None:
    """Run ``xkd search`` (``command``) as a separate process on the session's Ray with the ``hold``
    ``rules`` armed (``held_trial_points``, holding file ``tmp_path / "holding"``) and SIGKILL its
    process group once ``finished`` trials are recorded and the next is held: no handler runs."""
    experiment = Path(command[command.index("--out") + 1])
    log = open(tmp_path / "first.log", "w")
    with injected_faults(rules):
        first = subprocess.Popen(
            [sys.executable, str(REPO / "xkd_ray" / "search.py"), *command, "--address", address],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            held = (tmp_path / "holding").exists
            wait_for(lambda: held() and len(read_trials(experiment)) >= finished, 600, "trials and one held", first)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
            log.close()


@pytest.mark.slow
def test_a_streamed_search_from_a_user_teacher_resumes_after_sigkill(tmp_path, ray_local):
    """``data.storage: stream`` through ``xkd search``: a 2-trial space over an image folder, from a
    user's resnet18 given as weights, SIGKILLed while its second trial is held, then resumed. Trials
    train on the shards the first run wrote (the resume rebuilds neither shards nor maps, and no
    teacher is trained), the finished trial is kept, the front is that of all finished trials, and a
    front student given the raw test files reproduces the test accuracy its trial recorded. Both runs
    are jobs on the session's Ray: the first as a separate process (what is killed), the resume in this one."""
    from xkd_ray.student.predict import load_student_folder

    tree = digits_image_folder(tmp_path / "tree", 400)
    weights, _ = _user_teacher(tmp_path / "teacher")
    cache = tmp_path / "cache"
    points, rules = held_trial_points(tmp_path / "holding", finished_before=1)
    space = smoke_space(tmp_path, str(cache), trials=2, max_concurrent_trials=1, initial_points=points)
    raw = yaml.safe_load(space.read_text())
    raw["base"]["data"] = {"dataset": "imagefolder", "root": str(tree), "image_size": 16, "storage": "stream",
                           "val_fraction": 0.2}  # fmt: skip
    raw["base"]["teacher"] = {"arch": "torchvision.resnet18", "weights": str(weights)}
    raw["base"]["explain"]["layer"] = "net.layer1.1.conv2"
    space.write_text(yaml.safe_dump(raw))
    experiment = tmp_path / "experiment"
    command = ["--space", str(space), "--out", str(experiment), "--no-live"]
    _killed_while_held(command, rules, ray_local.get_runtime_context().gcs_address, tmp_path, finished=1)
    written = {path: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()}
    before = {r["trial_id"]: r for r in read_trials(experiment)}
    assert len(before) == 1
    assert search_main([*command, "--resume"]) == 0
    after = {r["trial_id"]: r for r in read_trials(experiment)}
    assert len(after) == 2 and set(before) < set(after)
    for trial_id, row in before.items():
        kept = after[trial_id]
        assert (kept["val_accuracy"], kept["finished_at"]) == (row["val_accuracy"], row["finished_at"])
    front = {r["trial_id"] for r in front_rows(list(after.values()))}
    listed = {r["trial_id"] for r in pq.read_table(experiment / "pareto" / "front.parquet").to_pylist()}
    assert listed == front
    assert {p.name for p in (experiment / "pareto").iterdir() if p.is_dir()} == front
    assert {path: path.stat().st_mtime_ns for path in written} == written  # nothing rewritten
    assert len(list((cache / "streams").iterdir())) == 1
    assert len(list((cache / "explanations").glob("teacher-*.stream"))) == 3  # train, val, test: once
    assert not (cache / "teachers").exists()
    assert {json.loads(r["config"])["data"]["storage"] for r in after.values()} == {"stream"}
    student_dir = next(p for p in (experiment / "pareto").iterdir() if p.is_dir())
    student = load_student_folder(student_dir)
    files = sorted((tree / "test").rglob("*.png"))
    labels = torch.tensor([student.prep.class_names.index(path.parent.name) for path in files])
    predicted = student.predict([str(path) for path in files], explain=False).labels
    recorded = json.loads((student_dir / "metrics.json").read_text())["test"]["accuracy"]
    assert (predicted == labels).float().mean().item() == pytest.approx(recorded, abs=1e-9)


def _scrape(port: int, experiment: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name.startswith("ray_xkd_") and f'experiment="{experiment}"' in line:
            found[name] = float(line.rsplit(" ", 1)[1])
    return found


@pytest.mark.slow
def test_search_gauges_reach_the_prometheus_endpoint_while_it_runs(ray_local, cache_dir, tmp_path):
    """The dashboard's gauges, read the way Prometheus scrapes them, from the node's metrics
    endpoint while a search runs (Ray prefixes custom metrics with ``ray_``). Ray exports a gauge
    only for ~15 s after it is set, so the search keeps setting them: with the second trial held
    (a ``hold`` fault) and no trial finishing, a scrape 25 s after the first trial was recorded
    must still show them, with the right values. Released, the search ends with both trials."""
    import threading

    import ray

    from xkd_ray.cluster.ray_search import run_search
    from xkd_ray.config.space import load_search_space

    points, rules = held_trial_points(tmp_path / "holding")
    path = smoke_space(tmp_path, cache_dir, trials=2, max_concurrent_trials=1, initial_points=points)
    name = "gauged"
    experiment = tmp_path / name
    done: dict[str, object] = {}
    port = ray._private.worker.global_worker.node.metrics_export_port
    with injected_faults(rules):
        search = threading.Thread(
            target=lambda: done.update(summary=run_search(load_search_space(path), experiment, live=False)),
            daemon=True,
        )
        search.start()
        held = (tmp_path / "holding").exists
        wait_for(lambda: held() and len(read_trials(experiment)) == 1, 600, "one trial and the second held")
        recorded = time.monotonic()  # the first trial was recorded (and the gauges set) before this
        scrapes: list[tuple[float, dict[str, float]]] = []

        def late_scrape_has_gauges() -> bool:
            assert search.is_alive()
            scrapes.append((time.monotonic() - recorded, _scrape(port, name)))
            late, found = scrapes[-1]
            return late >= 25 and {"ray_xkd_trials_finished", "ray_xkd_front_size"} <= set(found)

        wait_for(late_scrape_has_gauges, 120, "the gauges 25 s after the last trial was recorded")
    # Every scrape while the second trial was held: one finished trial, one student on the front.
    for _, found in scrapes:
        assert found.get("ray_xkd_trials_finished", 1.0) == 1.0 and found.get("ray_xkd_front_size", 1.0) == 1.0, found
    search.join(timeout=600)
    assert not search.is_alive() and done["summary"]["trials"] == 2
