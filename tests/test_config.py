"""Config validation: every bad value names its field; YAML and --set overrides round-trip."""

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from xkd_ray.config import ExperimentConfig, load_config, parse_override
from xkd_ray.errors import XKDConfigError


def test_defaults_are_valid_and_round_trip():
    config = ExperimentConfig()
    assert ExperimentConfig.from_dict(config.to_dict()) == config
    assert config.distill.method == "xd" and config.explain.explainer == "gradcam"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"distill.method": "magic"}, "distill.method"),
        ({"explain.explainer": "lime"}, "explain.explainer"),
        ({"data.dataset": "imagenet"}, "data.dataset"),
        ({"distill.temperature": 0}, "distill.temperature"),
        ({"distill.temperature": -1.5}, "distill.temperature"),
        ({"distill.alpha": 1.5}, "distill.alpha"),
        ({"distill.alpha": -0.1}, "distill.alpha"),
        ({"student.ae_depth": 5}, "student.ae_depth"),
        ({"student.fusion": "add"}, "student.fusion"),
        ({"distill.epochs": 0}, "distill.epochs"),
        ({"distill.unknown_knob": 1}, "distill.unknown_knob"),
        ({"data.dataset": "mnist"}, "data.root"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(XKDConfigError, match=field.replace(".", r"\.")):
        ExperimentConfig().with_overrides(override)


def test_ae_depth_too_deep_for_the_image_size():
    with pytest.raises(XKDConfigError, match="too deep"):
        ExperimentConfig().with_overrides({"data.image_size": 16, "student.ae_depth": 4})
    # The same depth is fine for a bigger image, and irrelevant for students without a head.
    ExperimentConfig().with_overrides({"data.image_size": 32, "student.ae_depth": 4})
    ExperimentConfig().with_overrides({"data.image_size": 16, "student.ae_depth": 4, "distill.method": "kd"})


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"distill": {"method": "kd", "temperature": 2.5}, "student": {"width": 8}}))
    config = load_config(path, dict([parse_override("distill.temperature=4")]))
    assert config.distill.method == "kd" and config.distill.temperature == 4 and config.student.width == 8


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distill:\n  alpha: 3\n")
    with pytest.raises(XKDConfigError, match=r"bad\.yaml: distill\.alpha"):
        load_config(path)
    path.write_text("teacher: [1, 2\n")
    with pytest.raises(XKDConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(XKDConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(XKDConfigError, match="optimizer: unknown section"):
        load_config(path)


def test_parse_override_needs_key_value():
    assert parse_override("distill.alpha=0.25") == ("distill.alpha", 0.25)
    with pytest.raises(XKDConfigError, match="key=value"):
        parse_override("distill.alpha")


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["data", "teacher", "explain", "student", "distill", "ray", "extra"]),
        st.dictionaries(
            st.sampled_from(["method", "temperature", "alpha", "beta", "ae_depth", "epochs", "dataset", "nonsense"]),
            st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True), st.text(max_size=8)),
            max_size=4,
        ),
        max_size=4,
    )
)
def test_parser_either_builds_a_valid_config_or_raises_a_config_error(raw):
    """Whatever mapping a user writes, the parser never crashes with anything but XKDConfigError."""
    try:
        config = ExperimentConfig.from_dict(raw)
    except XKDConfigError as exc:
        assert str(exc).split(":")[0]  # the message starts with the field at fault
    else:
        assert ExperimentConfig.from_dict(config.to_dict()) == config
