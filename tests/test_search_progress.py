"""A search's control loop and its log: test-split evaluation happens in the trial (never in the
driver, which never loads the data), and a redirected log gets plain progress lines."""

from __future__ import annotations

import itertools
import json
import logging
import re

import pytest

from tests.conftest import smoke_space

# How long the driver may take between one trial's final report and the next trial's start
# (one trial at a time, the trial process reused): Tune's bookkeeping and the registry's file
# writes, on a loaded 2-core machine. Evaluating a front member in the driver took longer
# (prepare() alone reads the whole data bundle), and would show here.
NEXT_TRIAL_BOUND_S = 5.0


def _final_results(experiment) -> list[dict]:
    finals = []
    for path in sorted((experiment / "tune").glob("*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        finals += [r for r in lines if r.get("status") == "ok"]
    return sorted(finals, key=lambda r: r["timings"]["driver_entered"])


def test_front_members_are_evaluated_by_their_trial_and_the_loop_goes_on(
    ray_local, cache_dir, tmp_path, caplog, monkeypatch
):
    import xkd_ray.cluster.progress_callbacks as callbacks
    import xkd_ray.core.prepared as prepared
    from xkd_ray.cluster.ray_search import run_search
    from xkd_ray.config.space import load_search_space
    from xkd_ray.core.checkpoints import read_json_mapping
    from xkd_ray.pareto.front import list_pareto_students

    calls: list[str] = []
    original = prepared.prepare
    monkeypatch.setattr(prepared, "prepare", lambda *a, **k: calls.append("prepare") or original(*a, **k))
    monkeypatch.setattr(callbacks, "PROGRESS_EVERY_S", 0.5)
    spec = load_search_space(smoke_space(tmp_path, cache_dir, trials=3, max_concurrent_trials=1))
    experiment = tmp_path / "experiment"
    with caplog.at_level(logging.INFO, logger="xkd_ray"):
        run_search(spec, experiment, live=False)

    assert calls == [], "the search's driver prepared the data bundle"
    finals = _final_results(experiment)
    assert len(finals) == 3
    for previous, following in itertools.pairwise(finals):
        gap = following["timings"]["driver_entered"] - previous["timings"]["driver_reported"]
        assert 0 <= gap < NEXT_TRIAL_BOUND_S, (gap, previous["timings"], following["timings"])
    # Every front member's test metrics are the ones its trial wrote into its student folder.
    front = list_pareto_students(experiment).to_pylist()
    assert front
    for row in front:
        written = read_json_mapping(experiment / "students" / row["trial_id"] / "metrics.json")["test"]
        assert row["test_accuracy"] == pytest.approx(written["accuracy"])

    messages = [r.getMessage() for r in caplog.records if r.name.startswith("xkd_ray")]
    finished = [m for m in messages if re.match(r"trial \S+ (ok|stopped|errored|diverged) after", m)]
    assert len(finished) == 3, messages
    epochs = spec.base.distill.epochs  # the epochs trained, not Tune's iterations (the final report is one more)
    assert all(re.match(rf"trial \S+ ok after {epochs} epoch\(s\): accuracy ", m) for m in finished), finished
    periodic = [r for r in caplog.records if r.getMessage().startswith("search: ")]
    assert periodic, messages
    assert re.search(
        r"search: \d/3 trials done \(\d+ stopped early\), \d running; best accuracy", periodic[-1].getMessage()
    )
    assert all(b.created - a.created >= 0.5 for a, b in itertools.pairwise(periodic))
    assert not any("Using an existing study" in m or "A new study created" in m for m in caplog.messages)
