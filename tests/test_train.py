"""Ray Train on the local Ray: worker-count independence, a killed worker, exact resume."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TWO_WORKER_RUN, injected_faults
from xkd_ray.cluster.ray_run import distill_with_ray
from xkd_ray.core.distill import distill

pytestmark = TWO_WORKER_RUN  # two tests compare with one two-worker run: build it in one worker only

# Global batch and sampler order are the same for any worker count (each rank takes every
# world-th index of one seeded permutation, with batch_size / world per rank) and the student
# uses GroupNorm, so 1 and 2 workers compute the same gradients up to float summation order in
# the all-reduce. One validation image is 1/270 of accuracy: allow two images, and 0.01 of
# Pearson fidelity, for that rounding to compound over epochs.
ACCURACY_TOLERANCE = 2 / 270
FIDELITY_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def train_config(tiny_config):
    return tiny_config.with_overrides({"distill.epochs": 4, "ray.cpus_per_worker": 0.9, "ray.max_failures": 1})


@pytest.fixture(scope="module")
def two_worker_run(ray_local, train_config, tiny_data, tmp_path_factory):
    config = train_config.with_overrides({"ray.num_workers": 2})
    return distill_with_ray(config, tiny_data, storage_path=tmp_path_factory.mktemp("ray2"))[1]


def test_one_and_two_workers_agree_with_the_plain_loop(ray_local, train_config, tiny_data, two_worker_run, tmp_path):
    one = distill_with_ray(train_config.with_overrides({"ray.num_workers": 1}), tiny_data, storage_path=tmp_path)[1]
    plain = distill(train_config, tiny_data, progress=False)[1]
    # One worker runs the plain loop's arithmetic on the plain loop's batches: bit-identical (the
    # node-loss test in tests/test_cluster.py takes the plain loop as its uninterrupted reference).
    for split in ("val", "test"):
        for key in ("accuracy", "fidelity", "fidelity_posthoc", "agreement"):
            assert one[split][key] == plain[split][key], (split, key)
    assert abs(one["val"]["accuracy"] - two_worker_run["val"]["accuracy"]) <= ACCURACY_TOLERANCE
    assert abs(one["val"]["fidelity"] - two_worker_run["val"]["fidelity"]) <= FIDELITY_TOLERANCE
    assert abs(one["val"]["fidelity_posthoc"] - two_worker_run["val"]["fidelity_posthoc"]) <= FIDELITY_TOLERANCE
    assert [h["workers"] for h in two_worker_run["history"]] == [2, 2, 2, 2]
    assert one["val"]["accuracy"] > 0.5


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint_and_reproduces_the_run(
    ray_local, train_config, tiny_data, two_worker_run, tmp_path
):
    """The last worker SIGKILLs itself at the start of epoch 2: Ray Train restarts the group,
    which resumes from its last checkpoint and ends exactly where an uninterrupted run ends."""
    config = train_config.with_overrides({"ray.num_workers": 2})
    with injected_faults([{"fault": "kill_worker", "epoch": 2, "when": {"ray.num_workers": 2}}]):
        _, metrics = distill_with_ray(config, tiny_data, storage_path=tmp_path)
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    # The restarted group resumed from a checkpoint (epoch 1's, or epoch 0's if the kill beat
    # the registration of epoch 1's report), never from scratch, and did not redo finished epochs.
    starts = [h["start_epoch"] for h in history]
    assert starts[0] == 0 and starts[-1] in (1, 2) and starts == sorted(starts)
    for key in ("accuracy", "fidelity", "fidelity_posthoc", "agreement"):
        assert metrics["val"][key] == pytest.approx(two_worker_run["val"][key], abs=1e-6)
        assert metrics["test"][key] == pytest.approx(two_worker_run["test"][key], abs=1e-6)


@pytest.mark.slow
def test_diverging_ray_run_stops_on_every_worker_with_a_clear_error(ray_local, train_config, tiny_data, tmp_path):
    """NaN/inf on any shard stops all workers together (no DDP deadlock) and the run's result
    says so; rerunning the same run name does not train the broken weights again."""
    from xkd_ray.errors import XKDTrainingDiverged

    config = train_config.with_overrides({"ray.num_workers": 2, "distill.lr": 1e6})
    with pytest.raises(XKDTrainingDiverged, match=r"NaN/inf at epoch \d"):
        distill_with_ray(config, tiny_data, storage_path=tmp_path, name="diverges")
    with pytest.raises(XKDTrainingDiverged, match=r"NaN/inf at epoch \d"):
        distill_with_ray(config, tiny_data, storage_path=tmp_path, name="diverges")


def test_trials_on_a_node_share_one_copy_of_the_prepared_data(ray_local, tiny_data):
    """The search puts the prepared data into the object store once; every trial process reads
    the node's copy in place (the same memory on every ``ray.get``), where a pickled torch tensor
    would be a private copy per read. The content survives the trip exactly."""
    import pickle

    ray = ray_local
    ref = ray.put(tiny_data)

    @ray.remote(num_cpus=0)
    def read_twice(box: list) -> dict:
        first, second = ray.get(box[0]), ray.get(box[0])
        pointers = [
            (a.data_ptr(), b.data_ptr())
            for a, b in [
                (first.splits.train.images, second.splits.train.images),
                (first.teacher_outputs["train"].maps, second.teacher_outputs["train"].maps),
                (
                    first.teacher_state[next(iter(first.teacher_state))],
                    second.teacher_state[next(iter(second.teacher_state))],
                ),
            ]
        ]
        legacy = ray.get(box[1])
        return {
            "pointers": pointers,
            "legacy": ray.get(box[1])["images"].data_ptr() == legacy["images"].data_ptr(),
            "fingerprint": first.splits.fingerprint(),
            "data": first,
        }

    legacy_ref = ray.put({"images": tiny_data.splits.train.images.clone()})
    seen = ray.get(read_twice.remote([ref, legacy_ref]))
    assert all(a == b for a, b in seen["pointers"]), "each read of the prepared data made a private copy"
    assert not seen["legacy"], "control: a pickled torch tensor should be copied on every read"
    assert seen["fingerprint"] == tiny_data.splits.fingerprint()
    for copy in (seen["data"], pickle.loads(pickle.dumps(tiny_data))):
        for name in ("train", "val", "test"):
            assert torch.equal(copy.teacher_outputs[name].maps, tiny_data.teacher_outputs[name].maps)
            assert torch.equal(copy.splits.split(name).labels, tiny_data.splits.split(name).labels)
        assert torch.equal(copy.template_map, tiny_data.template_map)
        assert copy.teacher_metrics == tiny_data.teacher_metrics
        images = tiny_data.splits.val.images[:8]
        assert torch.equal(copy.teacher()(images), tiny_data.teacher()(images))
