"""``--allow-space-change``: Tuner.restore brings back the searcher and callbacks pickled by the first
run; the resumed search must sample from, and record with, the new space."""

from __future__ import annotations

import pickle

import yaml

from tests.conftest import smoke_space


def _spaces(tmp_path, cache_dir):
    from xkd_ray.config.space import load_search_space

    old_path = smoke_space(tmp_path, cache_dir)
    raw = yaml.safe_load(old_path.read_text())
    raw["space"]["distill.temperature"] = {"loguniform": [20, 30]}
    new_path = tmp_path / "new.yaml"
    new_path.write_text(yaml.safe_dump(raw))
    return load_search_space(old_path), load_search_space(new_path)


def test_a_restored_searcher_and_registry_use_the_new_space(tmp_path, cache_dir):
    from xkd_ray.cluster.ray_search import make_searcher, param_space
    from xkd_ray.cluster.search_callbacks import RegistryCallback, register_spec

    old, new = _spaces(tmp_path, cache_dir)
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    first = make_searcher(old, experiment, dict)
    first.set_search_properties(None, None, param_space(old))  # what Tune does on a fresh run
    assert 1 <= first.suggest("a")["distill.temperature"] <= 10
    state = tmp_path / "searcher.pkl"
    first.save(str(state))
    callback = pickle.dumps(RegistryCallback(str(experiment), old))

    register_spec(experiment, new)  # run_search with the changed space, before Tuner.restore
    restored = make_searcher(new, experiment, dict)
    restored.restore(str(state))
    temperatures = [restored.suggest(f"t{i}")["distill.temperature"] for i in range(4)]
    assert all(20 <= t <= 30 for t in temperatures), temperatures
    registry = pickle.loads(callback)
    registry.setup()
    assert registry.spec is new
    assert registry.spec.trial_config({"distill.temperature": 25.0}).distill.temperature == 25.0
