"""Search spaces are checked against the trial configs they will produce: a space the parser
accepts never yields a trial whose config is refused later, inside a Ray worker."""

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from xkd_ray.config.methods import METHODS
from xkd_ray.config.space import SearchSpec, load_search_space, parse_search_space
from xkd_ray.errors import XKDConfigError


def _refused(space: dict) -> str:
    with pytest.raises(XKDConfigError) as exc:
        parse_search_space(space)
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def test_a_batch_the_trial_workers_cannot_split_is_refused_at_load():
    space = {"space": {"distill.batch_size": {"choice": [64, 63]}}, "search": {"workers_per_trial": 2}}
    message = _refused(space)
    assert message.startswith("space.distill.batch_size: value 63 is not valid"), message
    assert "ray.num_workers (2)" in message
    # The same base batch is fine as long as the trial's workers divide it.
    parse_search_space({"space": {"distill.batch_size": {"choice": [64, 62]}}, "search": {"workers_per_trial": 2}})
    message = _refused({"space": {"distill.alpha": 0.5}, "search": {"workers_per_trial": 3}})
    assert message.startswith("base: not valid with the search's worker settings") and "distill.batch_size" in message
    assert "distill.batch_size" in _refused(
        {"space": {"distill.batch_size": {"int": [32, 64]}}, "search": {"workers_per_trial": 2}}
    )


def test_a_float_range_over_an_integer_key_is_refused():
    message = _refused({"space": {"distill.batch_size": {"uniform": [16, 64]}}})
    assert message.startswith("space.distill.batch_size: value 16.0 is not valid") and "integer" in message


def test_rules_between_two_searched_keys_are_checked():
    space = {"space": {"distill.head_warmup_epochs": {"choice": [0, 5]}, "distill.epochs": {"choice": [10, 4]}}}
    message = _refused(space)
    assert message.startswith("space: the trial") and "head_warmup_epochs" in message, message
    # Each value passes alone and the all-first / all-last corners pass; (5, 3) does not.
    space = {"space": {"distill.head_warmup_epochs": {"choice": [1, 5, 0]}, "distill.epochs": {"choice": [10, 3, 6]}}}
    assert "head_warmup_epochs" in _refused(space)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("data.image_size: {choice: [16, 32]}", "prepared once"),
        ("explain.explainer: {choice: [gradcam, integrated_gradients]}", "prepared once"),
        ("teacher.width: {choice: [8, 16]}", "prepared once"),
        ("ray.amp: {choice: [true, false]}", "resources come from one place"),
        ("ray.num_workers: 2", "resources come from one place"),
    ],
)
def test_a_space_sampling_what_is_prepared_once_is_refused_naming_the_key(tmp_path, capsys, key, why):
    """Every trial trains on the data, teacher and explanations prepared once from base: a sampled
    value there would be recorded in the trial's config but never used, so `xkd search` refuses it."""
    from xkd_ray.ui.cli import main

    path = tmp_path / "space.yaml"
    path.write_text(f"space:\n  distill.alpha: {{uniform: [0, 1]}}\n  {key}\n")
    assert main(["search", "--space", str(path), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    name = key.partition(":")[0]
    assert len(lines) == 1 and f"space.{name}: cannot be" in lines[0] and why in lines[0], lines
    assert not (tmp_path / "out").exists()
    # A plain (fixed) value of a prepared section is the base for every trial: allowed.
    if not key.startswith("ray."):
        path.write_text(
            f"space:\n  distill.alpha: {{uniform: [0, 1]}}\n  {name}: {key.partition('[')[2].split(',')[0]}\n"
        )
        assert load_search_space(path).trial_config({}) is not None


@pytest.mark.parametrize(
    ("search", "field"),
    [
        ("hypervolume_reference: [a, b]", "search.hypervolume_reference"),
        ("hypervolume_reference: [.nan, 0]", "search.hypervolume_reference"),
        ("hypervolume_reference: [0, .inf]", "search.hypervolume_reference"),
        ("hypervolume_reference: 0.5", "search.hypervolume_reference"),
        ("max_failures: true", "search.max_failures"),
        ("seed: abc", "search.seed"),
        ("seed: -1", "search.seed"),
        ("trials: 0", "search.trials"),
        ("trials: 2.0", "search.trials"),
        ("workers_per_trial: true", "search.workers_per_trial"),
        ("cpus_per_worker: .inf", "search.cpus_per_worker"),
        ("max_concurrent_trials: 0", "search.max_concurrent_trials"),
        ("initial_points: [5]", "search.initial_points"),
        ("sampler: grid", "search.sampler"),
        ("trails: 4", "search.trails: unknown key"),
        ("objectives: [{metric: acuracy}, {metric: fidelity}]", "search.objectives"),
        ("objectives: [{metric: accuracy}]", "search.objectives: needs 2 or more different metrics"),
        ("objectives: [{metric: accuracy}, {metric: accuracy}]", "search.objectives: needs 2 or more"),
        ("objectives: [{metric: accuracy, direction: up}, {metric: fidelity}]", "search.objectives"),
        ("objectives: [{metric: accuracy}, {metric: params}]", "search.hypervolume_reference: set one value"),
        ("hypervolume_reference: [0, 0, 0]", "search.hypervolume_reference: 3 values for 2 objectives"),
        ("constraints: ['accuracy > 0.9']", "search.constraints[0]"),
        ("constraints: ['acuracy >= 0.9']", "search.constraints[0]: 'acuracy >= 0.9': unknown metric"),
        ("scheduler: {name: hyperband}", "search.scheduler.name"),
        ("scheduler: {name: mo_asha, reduction_factor: 1}", "search.scheduler.reduction_factor"),
        ("scheduler: {name: mo_asha, grace_epochs: 20}", "search.scheduler.grace_epochs: 20 leaves no epoch"),
        ("reference: {distill.beta: 1}", "search.reference.distill.beta: not a searched key"),
    ],
)
def test_bad_search_settings_name_the_field(tmp_path, search, field):
    path = tmp_path / "space.yaml"
    path.write_text(f"space:\n  distill.alpha: 0.5\n  distill.temperature: {{uniform: [1, 8]}}\nsearch:\n  {search}\n")
    with pytest.raises(XKDConfigError) as exc:
        load_search_space(path)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{path}: {field}"), message


def test_trial_config_is_base_then_workers_then_fixed_then_sampled():
    spec = parse_search_space(
        {
            "base": {"distill": {"method": "kd", "batch_size": 60}, "ray": {"cpus_per_worker": 3}},
            "space": {"distill.temperature": {"uniform": [1, 2]}, "distill.alpha": 0.25, "distill.beta": 1.0},
            "search": {"workers_per_trial": 3, "cpus_per_worker": 0.5},
        }
    )
    assert isinstance(spec, SearchSpec) and not hasattr(spec, "source")
    config = spec.trial_config({"distill.temperature": 1.5, "distill.beta": 2.0})
    assert (config.ray.num_workers, config.ray.cpus_per_worker) == (3, 0.5)
    assert (config.distill.method, config.distill.alpha, config.distill.temperature) == ("kd", 0.25, 1.5)
    assert config.distill.beta == 2.0  # sampled beats fixed
    assert spec.base.ray.num_workers == 0  # the base itself is untouched


def test_base_overrides_are_validated_with_the_base(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base": {"ray": {"amp": False}}, "space": {"distill.alpha": 0.5}}))
    spec = load_search_space(path, {"trials": 3}, base_overrides={"ray.use_gpu": True})
    assert spec.base.ray.use_gpu is True and spec.base.ray.amp is False and spec.search.trials == 3
    assert spec.trial_config({}).ray.use_gpu is True
    for overrides, expected in [
        ({"ray.use_gpu": "yes"}, "base.ray.use_gpu: got 'yes'"),
        ({"ray.gpus": 1}, "base.ray.gpus: unknown key"),
        ({"gpu": True}, "base.gpu: override keys look like section.key"),
    ]:
        with pytest.raises(XKDConfigError, match=f"^{path}: {expected}".replace(".", r"\.")):
            load_search_space(path, base_overrides=overrides)


def _range(low: float, high: float, kind: str) -> dict:
    return {kind: [low, high]} if low < high else {"choice": [low]}


# A few keys whose rules involve other keys (batch vs workers, depth vs image size vs method,
# the two fractions), plus plain bounds; at most four per space keeps every check exhaustive.
BATCHES = st.sampled_from([12, 24, 48, 64]) | st.integers(1, 70)
IMAGES = st.sampled_from([8, 16, 24, 32]) | st.integers(8, 40)
KEYS = {
    "distill.batch_size": st.one_of(
        st.lists(BATCHES, min_size=1, max_size=3).map(lambda v: {"choice": v}),
        st.tuples(st.integers(1, 70), st.integers(1, 70)).map(lambda b: _range(min(b), max(b), "int")),
    ),
    "student.ae_depth": st.one_of(
        st.lists(st.integers(1, 5), min_size=1, max_size=3).map(lambda v: {"choice": v}),
        st.integers(1, 5).map(lambda high: _range(1, high, "int")),
    ),
    "data.image_size": st.one_of(
        st.lists(IMAGES, min_size=1, max_size=3).map(lambda v: {"choice": v}),
        st.tuples(st.integers(8, 40), st.integers(8, 40)).map(lambda b: _range(min(b), max(b), "int")),
    ),
    "distill.temperature": st.tuples(st.sampled_from([-1, 0, 0.5, 1]), st.sampled_from([0.5, 4, 20])).map(
        lambda b: {"uniform": list(b)} if b[0] < b[1] else b[0]
    ),
    "distill.method": st.lists(st.sampled_from(sorted(METHODS)), min_size=1, max_size=3, unique=True).map(
        lambda v: {"choice": v}
    ),
    "data.val_fraction": st.sampled_from([{"uniform": [0.1, 0.5]}, {"uniform": [0.1, 0.9]}, 0.3]),
    "data.test_fraction": st.sampled_from([{"uniform": [0.1, 0.4]}, 0.2, 0.6]),
    "ray.num_workers": st.lists(st.integers(1, 4), min_size=1, max_size=3).map(lambda v: {"choice": v}),
}


@st.composite
def spaces(draw):
    names = draw(st.lists(st.sampled_from(sorted(KEYS)), min_size=1, max_size=4, unique=True))
    return {
        "space": {name: draw(KEYS[name]) for name in names},
        "search": {"workers_per_trial": draw(st.integers(1, 4)), "trials": 4},
    }


def _sample(parameter, data) -> object:
    """What a sampler may propose: any choice, an end or any value inside a range."""
    if parameter.kind == "choice":
        return data.draw(st.sampled_from(parameter.choices))
    if parameter.kind == "int":
        return data.draw(st.integers(parameter.low, parameter.high))
    ends = st.sampled_from([parameter.low, parameter.high])
    return data.draw(ends | st.floats(parameter.low, parameter.high))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spaces(), st.data())
def test_every_trial_of_an_accepted_space_is_a_valid_config(raw, data):
    try:
        spec = parse_search_space(raw)
    except XKDConfigError as exc:
        assert "\n" not in str(exc)
        event("refused")
        return
    event("accepted")
    searched = {name: p for name, p in spec.parameters.items() if p.kind != "fixed"}
    corners = [{name: p.probes()[end] for name, p in searched.items()} for end in (0, -1)]
    for point in [*corners, *({n: _sample(p, data) for n, p in searched.items()} for _ in range(5))]:
        config = spec.trial_config(point)  # raises XKDConfigError if the check let a bad trial through
        assert config.ray.num_workers == point.get("ray.num_workers", spec.search.workers_per_trial)
        assert math.isfinite(config.distill.temperature)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "search_spaces").glob("*.yaml")))
def test_every_searched_value_of_a_shipped_space_lands_in_its_trial_config(path):
    """Each value a shipped space can sample reaches the trial's config under its own key (no key
    is silently ignored or overwritten), and every trial runs with the search's worker settings."""
    spec = load_search_space(path)
    searched = {name: p for name, p in spec.parameters.items() if p.kind != "fixed"}
    assert searched, path
    for name, parameter in searched.items():
        section, _, key = name.partition(".")
        for value in parameter.probes():
            config = spec.trial_config({name: value})
            assert getattr(getattr(config, section), key) == value
            assert config.ray.num_workers == spec.search.workers_per_trial
            assert config.ray.cpus_per_worker == spec.search.cpus_per_worker


def test_objectives_default_to_the_registry_direction_and_reference_fills_from_base(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "space:\n  distill.method: {choice: [kd, xd]}\n  distill.lr: {loguniform: [0.001, 0.01]}\n"
        "search:\n  objectives: [{metric: accuracy}, {metric: latency_ms}]\n"
        "  hypervolume_reference: [0, 100]\n  reference: {distill.method: kd}\n"
    )
    spec = load_search_space(path)
    assert spec.search.objective_pairs() == [("accuracy", "max"), ("latency_ms", "min")]
    assert spec.reference_point() == {"distill.method": "kd", "distill.lr": 0.005}  # lr: the config default
    # A base value outside the searched range cannot be the reference.
    path.write_text(path.read_text().replace("[0.001, 0.01]", "[0.01, 0.1]"))
    with pytest.raises(XKDConfigError, match=r"search.reference.distill.lr: 0.005 is outside \[0.01, 0.1\]"):
        load_search_space(path)


def test_the_reference_and_cli_defaults_train_exactly_what_xkd_distill_trains():
    """The reference is `xkd distill --method xd` with its CLI defaults, on the base's data and
    teacher: a base that trains fewer epochs or a smaller student does not handicap it."""
    from xkd_ray.config.schema import ExperimentConfig

    spec = parse_search_space(
        {
            "base": {"data": {"image_size": 16}, "student": {"width": 8}, "distill": {"epochs": 3}},
            "space": {"distill.method": {"choice": ["kd", "xd"]}, "distill.temperature": {"uniform": [1, 10]}},
            "search": {"trials": 4, "reference": {"distill.method": "xd"}, "cli_defaults": ["kd", "xd"]},
        }
    )
    cli = ExperimentConfig().with_overrides({"distill.method": "xd", "data.image_size": 16})
    reference, kd = spec.cli_points()
    assert reference == {"distill.method": "xd", "distill.temperature": cli.distill.temperature}
    trained = spec.config_for(reference)
    assert trained.distill == cli.distill and trained.student == cli.student and trained.data.image_size == 16
    assert spec.is_reference(reference) and not spec.is_reference(kd)
    assert spec.config_for(kd).distill.method == "kd" and spec.config_for(kd).distill.epochs == 20
    sampled = {"distill.method": "xd", "distill.temperature": 2.5}
    assert spec.config_for(sampled).distill.epochs == 3 and spec.config_for(sampled).student.width == 8
    assert spec.cli_differences() == [
        "student.width: 16 (other trials: 8)",
        "distill.epochs: 20 (other trials: 3)",
    ]
    # A CLI default outside the searched range could never be proposed: refused, naming the key.
    message = _refused({**spec_raw_with("distill.temperature", [5, 10]), "search": {"cli_defaults": ["kd"]}})
    assert message.startswith("search.cli_defaults[0].distill.temperature: 4.0 is outside [5, 10]"), message


def spec_raw_with(name: str, bounds: list[float]) -> dict:
    return {"space": {"distill.method": {"choice": ["kd", "xd"]}, name: {"uniform": bounds}}}


def test_an_objective_or_constraint_not_measured_on_val_is_refused_at_load():
    """Trials report val metrics: ROAD runs there only with ``faithfulness.road: all`` and MPRT
    only with ``mprt: true``, otherwise every trial's objective would be None."""
    space = {"distill.temperature": {"uniform": [1.0, 4.0]}}
    road = [{"metric": "accuracy"}, {"metric": "road_morf_auc_posthoc"}]
    road_search = {"objectives": road, "hypervolume_reference": [0, 1]}  # ROAD MoRF is minimised
    message = _refused({"space": space, "search": road_search})
    assert message.startswith("search.objectives[1]: road_morf_auc_posthoc is measured on val only"), message
    assert "'test'" in message
    accepted = parse_search_space({"base": {"faithfulness": {"road": "all"}}, "space": space, "search": road_search})
    assert [o.metric for o in accepted.search.objectives] == ["accuracy", "road_morf_auc_posthoc"]
    constraint = {"constraints": ["road_lerf_auc_posthoc >= 0.5"]}
    assert _refused({"space": space, "search": constraint}).startswith("search.constraints[0]: road_lerf_auc_posthoc")
    mprt = {"objectives": [{"metric": "accuracy"}, {"metric": "mprt_ssim_posthoc"}], "hypervolume_reference": [0, 1]}
    assert parse_search_space({"space": space, "search": mprt}).search.objectives[1].metric == "mprt_ssim_posthoc"
    refused = _refused({"base": {"faithfulness": {"mprt": False}}, "space": space, "search": mprt})
    assert refused.startswith("search.objectives[1]: mprt_ssim_posthoc is not measured"), refused
