"""The plain (single-process) pipeline on real digits: teacher, explanation cache, students."""

from __future__ import annotations

import pytest
import torch

import xkd_ray.core.explain as explain_module
from xkd_ray.config.methods import METHODS
from xkd_ray.core.checkpoints import load_student
from xkd_ray.core.distill import distill, save_student
from xkd_ray.core.metrics import METRICS
from xkd_ray.core.prepared import prepare
from xkd_ray.errors import XKDCheckpointError

E2KD_TINY_WEIGHT = 0.25


def test_teacher_learns_and_explanations_are_normalised_maps(tiny_data):
    assert tiny_data.teacher_metrics["test_accuracy"] > 0.8
    for split in ("train", "val", "test"):
        outputs = tiny_data.teacher_outputs[split]
        images = tiny_data.splits.split(split).images
        assert outputs.maps.shape == (len(images), 16, 16)
        assert outputs.logits.shape == (len(images), 10)
        assert float(outputs.maps.min()) >= 0.0 and float(outputs.maps.max()) <= 1.0
    assert tiny_data.template_map.shape == (16, 16)


def test_second_prepare_reads_the_cache_and_calls_no_explainer(tiny_config, tiny_data, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the explainer ran although the cache holds the maps")

    monkeypatch.setattr(explain_module, "explain_maps", refuse)
    again = prepare(tiny_config, progress=False)
    assert again.cache_hits == {"train": True, "val": True, "test": True}
    assert torch.equal(again.teacher_outputs["val"].maps, tiny_data.teacher_outputs["val"].maps)
    assert again.teacher_id == tiny_data.teacher_id


def test_cache_key_changes_with_the_explainer(tiny_config, tiny_data):
    saliency = prepare(tiny_config.with_overrides({"explain.explainer": "saliency"}), progress=False)
    assert saliency.cache_hits["val"] is False
    assert saliency.cache_files["val"] != tiny_data.cache_files["val"]
    assert not torch.equal(saliency.teacher_outputs["val"].maps, tiny_data.teacher_outputs["val"].maps)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_reports_all_metrics(tiny_config, tiny_data, method):
    """Each registered method trains exactly its own loss terms and reports every registered metric."""
    entry = METHODS[method]
    overrides = {"distill.method": method}
    if entry.e2kd:
        # On 16x16 images with a width-8 student the default weight (2, chosen on 32x32 digits)
        # keeps the classifier at chance: the scale-invariant map loss dominates (README).
        overrides["distill.e2kd_weight"] = E2KD_TINY_WEIGHT
    data = tiny_data
    if entry.student_map == "gradient":  # its map is matched to a pixel-attribution teacher's
        overrides["explain.explainer"] = "saliency"
        data = prepare(tiny_config.with_overrides(overrides), progress=False)
    student, metrics = distill(tiny_config.with_overrides(overrides), data, progress=False)
    assert set(metrics["val"]) == set(METRICS) and set(metrics["test"]) == set(METRICS)
    assert (student.head is not None) == entry.head
    terms = {name.removeprefix("train_") for name in metrics["history"][-1] if name.startswith("train_")}
    switches = {"kd": entry.kd, "explanation": entry.head, "at": entry.attention, "e2kd": entry.e2kd}
    expected = {"ce", "total"} | {term for term, on in switches.items() if on}
    assert terms == expected
    assert metrics["test"]["accuracy"] > 0.3  # two epochs on 10 classes: well above chance


def test_e2kd_moves_the_students_own_map_towards_the_teachers(tiny_config, tiny_data):
    """The e2KD term trains the student's own Grad-CAM: its post-hoc fidelity (and skill over the
    constant map) rises far above plain KD's, on the same data, seed and epochs."""
    kd = distill(tiny_config.with_overrides({"distill.method": "kd"}), tiny_data, progress=False)[1]["val"]
    config = tiny_config.with_overrides({"distill.method": "e2kd", "distill.e2kd_weight": E2KD_TINY_WEIGHT})
    e2kd = distill(config, tiny_data, progress=False)[1]["val"]
    assert e2kd["fidelity_posthoc"] > kd["fidelity_posthoc"] + 0.3
    assert e2kd["fidelity_posthoc_skill"] > 0 > kd["fidelity_posthoc_skill"]


def test_the_head_learns_the_target_its_method_gives_it(tiny_config, tiny_data):
    """xd's head copies the teacher's map; xd_e2kd_own's copies the student's own map. With the
    e2KD pull off (weight 0) the two targets differ, and each head follows its own: the own-map
    head agrees with the student's post-hoc map far more (head_honesty), the teacher-map head
    with the teacher's (fidelity). Same seed, data and epochs."""
    runs = {}
    for method in ("xd", "xd_e2kd_own"):
        config = tiny_config.with_overrides({"distill.method": method, "distill.e2kd_weight": 0.0})
        runs[method] = distill(config, tiny_data, progress=False)[1]["val"]
    xd, own = runs["xd"], runs["xd_e2kd_own"]
    assert own["head_honesty"] > xd["head_honesty"] + 0.15, (own, xd)
    assert xd["fidelity"] > own["fidelity"] + 0.2, (own, xd)


def test_the_honesty_term_pulls_the_students_own_map_to_its_head(tiny_config, tiny_data):
    """distill.honesty_weight alone (the e2KD pull to the teacher off): the student's own map
    follows its head's, so the head's map describes the student (head_honesty far higher than
    without the term; same seed, data and epochs). A method without e2kd's own map ignores it."""
    runs = {}
    for weight in (0.0, 2.0):
        config = tiny_config.with_overrides(
            {"distill.method": "xd_e2kd", "distill.e2kd_weight": 0.0, "distill.honesty_weight": weight}
        )
        runs[weight] = distill(config, tiny_data, progress=False)[1]
    assert runs[2.0]["val"]["head_honesty"] > runs[0.0]["val"]["head_honesty"] + 0.5, runs
    assert "train_honesty" in runs[2.0]["history"][-1] and "train_honesty" not in runs[0.0]["history"][-1]
    xd = tiny_config.with_overrides({"distill.method": "xd", "distill.honesty_weight": 2.0, "distill.epochs": 1})
    assert "train_honesty" not in distill(xd, tiny_data, progress=False)[1]["history"][-1]


def test_head_warmup_trains_only_the_head_first(tiny_config, tiny_data):
    """Warm-up epochs change the head and nothing else (AdamW's weight decay included)."""
    config = tiny_config.with_overrides({"distill.head_warmup_epochs": 1})
    snapshots = []
    _, metrics = distill(
        config,
        tiny_data,
        progress=False,
        on_epoch_end=lambda epoch, record, student: snapshots.append(
            {k: v.detach().clone() for k, v in student.state_dict().items()}
        ),
    )
    first, second = metrics["history"]
    assert set(first) >= {"train_explanation", "train_total"} and "train_ce" not in first
    assert "train_ce" in second
    from xkd_ray.core.distill import build_student

    torch.manual_seed(config.distill.seed)
    initial = build_student(config, tiny_data.splits).state_dict()
    after_warmup, after_joint = snapshots
    classifier = [k for k in initial if not k.startswith("head.")]
    assert all(torch.equal(after_warmup[k], initial[k]) for k in classifier)
    assert not all(torch.equal(after_warmup[k], initial[k]) for k in initial if k.startswith("head."))
    assert not all(torch.equal(after_joint[k], after_warmup[k]) for k in classifier)


def test_saved_student_reloads_with_identical_outputs(tiny_config, tiny_data, tmp_path):
    student, metrics = distill(tiny_config, tiny_data, progress=False)
    save_student(tmp_path / "student", tiny_config, student, tiny_data, metrics)
    loaded, record, saved_metrics = load_student(tmp_path / "student")
    images = tiny_data.splits.test.images[:8]
    assert torch.allclose(loaded.eval()(images), student.eval()(images))
    assert record["experiment"]["distill"]["method"] == "xd"
    assert saved_metrics["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


def test_student_folder_problems_are_checkpoint_errors(tiny_config, tiny_data, tmp_path):
    student, metrics = distill(tiny_config, tiny_data, progress=False)
    folder = save_student(tmp_path / "s", tiny_config, student, tiny_data, metrics)
    (folder / "model.pt").write_bytes((folder / "model.pt").read_bytes()[:100])
    with pytest.raises(XKDCheckpointError, match="not a loadable weights file"):
        load_student(folder)
    (folder / "model.pt").unlink()
    with pytest.raises(XKDCheckpointError, match="checkpoint file not found"):
        load_student(folder)


@pytest.mark.slow  # two full tiny runs: the full suite runs it, make test-fast does not
def test_same_seed_gives_identical_metrics_on_cpu(tiny_config, tiny_data):
    first = distill(tiny_config, tiny_data, progress=False)[1]
    second = distill(tiny_config, tiny_data, progress=False)[1]
    exact = [name for name, metric in METRICS.items() if metric.exact]  # not wall-clock latency
    for split in ("val", "test"):
        assert {k: first[split][k] for k in exact} == {k: second[split][k] for k in exact}
    assert first["test"]["latency_ms"] > 0 and first["test"]["params"] == second["test"]["params"]


def test_malicious_student_pickle_is_refused_and_never_runs(tiny_config, tiny_data, tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    student, metrics = distill(tiny_config, tiny_data, progress=False)
    folder = save_student(tmp_path / "s", tiny_config, student, tiny_data, metrics)
    torch.save({"stage1.0.weight": Payload()}, folder / "model.pt")
    with pytest.raises(XKDCheckpointError, match="not a loadable weights file"):
        load_student(folder)
    assert not marker.exists()


def test_diverging_run_stops_with_a_clear_error(tiny_config, tiny_data):
    from xkd_ray.errors import XKDTrainingDiverged

    with pytest.raises(XKDTrainingDiverged, match="NaN/inf"):
        distill(tiny_config.with_overrides({"distill.lr": 1e6, "distill.epochs": 3}), tiny_data, progress=False)
