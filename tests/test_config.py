"""Config validation: every bad value is refused at load with one line naming its field, and no
value the schema accepts can fail later inside training."""

import math
import time
import types

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from xkd_ray.config.methods import METHODS
from xkd_ray.config.schema import ExperimentConfig, load_config
from xkd_ray.config.space import load_search_space
from xkd_ray.config.yaml_loader import parse_override, parse_overrides, read_yaml
from xkd_ray.core.losses import EXPLANATION_LOSSES
from xkd_ray.core.models import FUSIONS
from xkd_ray.errors import XKDConfigError

SCHEMA = {name: set(info.annotation.model_fields) for name, info in ExperimentConfig.model_fields.items()}


def assert_one_line_naming_a_field(message: str, prefix: str = "") -> None:
    """The CLI prints the message as its one error line: it must start with what is at fault."""
    assert "\n" not in message and message.startswith(prefix), message
    head, sep, problem = message[len(prefix) :].partition(": ")
    assert sep and problem, message
    if head == "config":  # the document itself is not a mapping of sections
        return
    section, _, key = head.partition(".")
    if section not in SCHEMA:
        assert not key and problem.startswith("unknown section"), message
    elif key:
        assert key in SCHEMA[section] or problem.startswith("unknown key"), message


def test_defaults_are_valid_and_round_trip():
    config = ExperimentConfig()
    assert ExperimentConfig.from_dict(config.to_dict()) == config
    assert config.distill.method == "xd" and config.explain.explainer == "gradcam"
    assert ExperimentConfig.from_dict({"distill": None}) == config  # an empty YAML section


def test_choices_come_from_the_registries():
    with pytest.raises(XKDConfigError, match=f"allowed values are {', '.join(METHODS)}$"):
        ExperimentConfig().with_overrides({"distill.method": "magic"})


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
        ({"data.image_size": 4}, "data.image_size"),
        ({"distill.head_warmup_epochs": 20}, "distill.head_warmup_epochs"),
        ({"data.val_fraction": 0.5, "data.test_fraction": 0.5}, "data.val_fraction"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(XKDConfigError, match="^" + field.replace(".", r"\.")) as exc:
        ExperimentConfig().with_overrides(override)
    assert_one_line_naming_a_field(str(exc.value))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"explain.blur_sigma": math.inf}, "explain.blur_sigma"),
        ({"distill.at_weight": math.inf}, "distill.at_weight"),
        ({"teacher.weight_decay": math.inf}, "teacher.weight_decay"),
        ({"teacher.weight_decay": True}, "teacher.weight_decay"),
        ({"distill.temperature": math.nan}, "distill.temperature"),
        ({"distill.lr": "0.1"}, "distill.lr"),
        ({"explain.layer": 5}, "explain.layer"),
        ({"explain.layer": ["stage3"]}, "explain.layer"),
        ({"explain.cache_dir": 5}, "explain.cache_dir"),
        ({"explain.cache_dir": [".xkd_cache"]}, "explain.cache_dir"),
        ({"explain.cache_dir": ""}, "explain.cache_dir"),
        ({"teacher.checkpoint": 5}, "teacher.checkpoint"),
        ({"teacher.checkpoint": ["a.pt"]}, "teacher.checkpoint"),
        ({"data.root": 5}, "data.root"),
        ({"data.max_train_samples": True}, "data.max_train_samples"),
        ({"distill.seed": 2**64}, "distill.seed"),  # torch.manual_seed overflows
        ({"ray.num_workers": 3}, "distill.batch_size"),  # the default batch of 64
    ],
)
def test_known_holes_are_refused(override, field):
    with pytest.raises(XKDConfigError, match="^" + field.replace(".", r"\.")) as exc:
        ExperimentConfig().with_overrides(override)
    assert_one_line_naming_a_field(str(exc.value))
    if "ray.num_workers" in override:
        assert "ray.num_workers" in str(exc.value)


def test_an_int_is_fine_where_a_float_is_expected():
    config = ExperimentConfig().with_overrides({"distill.temperature": 4, "distill.beta": 0})
    assert config.distill.temperature == 4.0 and config.distill.beta == 0.0
    assert ExperimentConfig().with_overrides({"ray.num_workers": 4}).ray.num_workers == 4


def test_cli_refuses_a_bad_set_before_writing_anything(tmp_path, monkeypatch, capsys):
    from xkd_ray.ui.cli import main

    assert parse_override("explain.blur_sigma=.inf")[1] == math.inf  # YAML: .inf is a float
    assert parse_override("explain.blur_sigma=inf")[1] == "inf"  # ... and inf a string
    monkeypatch.chdir(tmp_path)  # the cache folder is relative: it would appear here
    argv = ["distill", "--method", "kd", "--out", str(tmp_path / "o"), "--set", "explain.blur_sigma=.inf"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.endswith("\n") and error.count("\n") == 1, error
    assert error.startswith("xkd: error: explain.blur_sigma: got inf; must be finite"), error
    assert list(tmp_path.iterdir()) == []


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


def test_a_bare_off_in_yaml_or_set_means_off_not_false(tmp_path):
    """PyYAML reads ``road: off`` as ``false``; the user wrote the choice ``off``."""
    path = tmp_path / "experiment.yaml"
    path.write_text("faithfulness:\n  road: off\n")
    assert load_config(path).faithfulness.road == "off"
    assert load_config(None, dict([parse_override("faithfulness.road=off")])).faithfulness.road == "off"
    with pytest.raises(XKDConfigError, match=r"faithfulness\.road"):
        load_config(None, dict([parse_override("faithfulness.road=true")]))


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distill:\n  alpha: 3\n")
    with pytest.raises(XKDConfigError, match=r"bad\.yaml: distill\.alpha"):
        load_config(path)
    path.write_text("teacher: [1, 2\n")
    with pytest.raises(XKDConfigError, match="not valid YAML") as exc:
        load_config(path)
    assert "\n" not in str(exc.value)
    with pytest.raises(XKDConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    for text, expected in [
        ("optimizer:\n  lr: 1\n", "optimizer: unknown section"),
        ("- 1\n- 2\n", "config: expected a mapping of sections, got list"),
        ("distill: [1, 2]\n", "distill: expected a mapping, got list"),
        ("distill:\n  '1': 2\n", "distill.1: unknown key"),
    ]:
        path.write_text(text)
        with pytest.raises(XKDConfigError, match=f"^{path}: {expected}") as exc:
            load_config(path)
        assert_one_line_naming_a_field(str(exc.value), prefix=f"{path}: ")


def test_parse_override_needs_key_value():
    assert parse_override("distill.alpha=0.25") == ("distill.alpha", 0.25)
    with pytest.raises(XKDConfigError, match="key=value"):
        parse_override("distill.alpha")


def test_a_file_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("distill:\n  method: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(XKDConfigError, match=rf"^{path}: not UTF-8 text \(byte 0xe9 at offset 22, line 2\)$"):
        load_config(path)
    with pytest.raises(XKDConfigError, match=rf"^{path}: not UTF-8 text"):
        load_search_space(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("distill: {1: 2, foo: 3}\n", "distill.1: keys must be strings; this one reads as an integer"),
        ("distill:\n  null: 2\n", "distill.null: keys must be strings; this one reads as null"),
        ("distill: {[1]: 2}\n", "distill.?: keys must be strings; this one is a list"),
        ("space: {distill.lr: {1: 2, uniform: [0, 1]}}\n", "space.distill.lr.1: keys must be strings"),
        ("search: {initial_points: [{distill.lr: 1, 2: 3}]}\n", "search.initial_points[0].2: keys must be"),
    ],
)
def test_yaml_keys_must_be_strings(tmp_path, text, expected):
    """A key that is not a string (``1:``, ``null:``) is refused where it is read, whatever later
    code does with keys (reported: a TypeError from sorting mixed key types)."""
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(XKDConfigError) as exc:
        read_yaml(path, "config file")
    assert str(exc.value).startswith(f"{path}: {expected}") and "\n" not in str(exc.value)
    with pytest.raises(XKDConfigError, match=r"^--set 'distill.lr=\{1: 2\}': value 1: keys must be strings"):
        parse_override("distill.lr={1: 2}")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("distill: &x [*x]\n", r"distill\[0\]"),
        ("distill: &x {lr: *x}\n", "distill.lr"),
        ("base: {distill: {lr: &y [1, {a: [*y]}]}}\n", r"base.distill.lr\[1\].a\[0\]"),
    ],
)
def test_a_recursive_alias_is_refused(tmp_path, text, where):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    problem = "alias \\*[xy] is inside its own anchor"
    with pytest.raises(XKDConfigError, match=f"^{path}: {where}: {problem}"):
        read_yaml(path, "config file")
    with pytest.raises(XKDConfigError, match=f"^--set 'distill.lr=&x \\[\\*x\\]': value \\[0\\]: {problem}"):
        parse_override("distill.lr=&x [*x]")


def test_an_alias_bomb_is_refused_fast(tmp_path):
    """Nine lists of nine aliases (462 bytes) are 9**9 strings to whatever walks them: pydantic
    took minutes and gigabytes to report that ``distill.method`` is not a string."""
    lines = ['lol: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"x{name}: &{name} [{', '.join(['*' + previous] * 9)}]")
    text = "\n".join(lines) + "\ndistill: {method: *i}\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert len(text) < 600
    started = time.monotonic()
    for load in (lambda: read_yaml(path, "config file"), lambda: load_config(path), lambda: load_search_space(path)):
        with pytest.raises(XKDConfigError, match=f"^{path}: x[a-i]: more than 10000 values once aliases are expanded$"):
            load()
    with pytest.raises(XKDConfigError, match="value xe: more than 10000 values"):
        parse_override("distill.method=" + "{" + ", ".join(lines).replace("lol: ", "xa: ") + "}")
    deep = tmp_path / "deep.yaml"
    deep.write_text("distill: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(XKDConfigError, match=f"^{deep}: distill(\\[0\\])+: nested deeper than 100 levels$"):
        load_config(deep)
    assert time.monotonic() - started < 2


def test_a_shared_alias_and_a_merge_key_still_work(tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text("teacher: &common {seed: 3, lr: 0.01}\ndistill:\n  <<: *common\n  lr: 0.02\n")
    config = load_config(path)
    assert (config.teacher.seed, config.teacher.lr, config.distill.seed, config.distill.lr) == (3, 0.01, 3, 0.02)


def test_a_yaml_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("distill:\n  lr: 1\n  method: kd\n  lr: 2\n")
    with pytest.raises(XKDConfigError, match=rf"^{path}: distill.lr: key given twice \(lines 2 and 4\); give it once$"):
        load_config(path)
    path.write_text("distill: {lr: 1, 'lr': 2}\n")
    with pytest.raises(XKDConfigError, match=r"distill\.lr: key given twice"):
        load_config(path)
    with pytest.raises(XKDConfigError, match=r"^--set 'search.initial_points=\[\{a: 1, a: 2\}\]': value \[0\].a: key"):
        parse_override("search.initial_points=[{a: 1, a: 2}]")


def test_a_set_key_given_twice_is_refused():
    assert parse_overrides(["distill.lr=0.1", "distill.alpha=0.5"]) == {"distill.lr": 0.1, "distill.alpha": 0.5}
    assert parse_overrides([]) == {}
    with pytest.raises(
        XKDConfigError, match=r"^--set distill.lr: given twice \('distill.lr=0.1' and ' distill.lr=2'\)"
    ):
        parse_overrides(["distill.lr=0.1", "distill.alpha=0.5", " distill.lr=2"])


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("1e-3", 1e-3),
        ("5E-4", 5e-4),
        ("1e+2", 100.0),
        ("2e5", 2e5),
        ("-1.5e3", -1500.0),
        (".5e1", 5.0),
        ("1.e2", 100.0),
    ],
)
def test_scientific_notation_is_a_float(tmp_path, text, number):
    """YAML 1.1 wants ``1.0e-3``; ``1e-3`` was the string "1e-3", refused as not a number."""
    value = parse_override(f"distill.lr={text}")[1]
    assert type(value) is float and value == number
    path = tmp_path / "lr.yaml"
    path.write_text(f"distill:\n  lr: {text}\n")
    assert read_yaml(path, "config file") == {"distill": {"lr": number}}
    if number > 0:
        assert load_config(path).distill.lr == number


@pytest.mark.parametrize("text", ["1e", "e5", "1e-", "1e3.5", "1.2.3e4", "1e3x", "0x1e3", "1_0e3", "inf", "1 e3"])
def test_other_strings_stay_what_they_were(text):
    assert parse_override(f"explain.layer={text}")[1] == yaml.safe_load(text)


YAML_KEYS = st.sampled_from(["lr", "method", "seed", "nonsense", "1", "null", "yes", "1e-3", "'2'", "[1]", "{a: 1}"])
YAML_VALUES = st.sampled_from(
    ["1", "1e-3", "kd", "~", "*a", "&a [1, 2]", "&a [*a]", "&a {b: *a}", "[*a, *a]", "{1: 2, foo: 3}", "{b: 1, b: 2}"]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([*SCHEMA, "extra"]), YAML_KEYS, YAML_VALUES), max_size=5))
def test_every_yaml_text_gives_a_config_or_one_line(tmp_path, entries):
    """YAML text with aliases, anchors and keys of every type: a config, or one line naming the file."""
    path = tmp_path / "fuzz.yaml"
    path.write_text("".join(f"{section}: {{{key}: {value}}}\n" for section, key, value in entries))
    try:
        load_config(path)
    except XKDConfigError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"{path}: ") and len(message) < 1000, message


ALL_KEYS = [*sorted(set().union(*SCHEMA.values())), "nonsense"]
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 50),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from([*METHODS, *FUSIONS, "digits", "vgg", "gradcam", "pearson"]),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*SCHEMA, "extra"]),
        st.one_of(st.dictionaries(st.sampled_from(ALL_KEYS), ANY_VALUE, max_size=4), ANY_VALUE),
        max_size=4,
    )
)
def test_every_error_is_one_line_naming_a_field_of_the_schema(raw):
    """Whatever mapping a user writes, the parser builds a config that round-trips, or refuses
    it with one line that starts with a section or a ``section.field`` of the schema."""
    try:
        config = ExperimentConfig.from_dict(raw)
    except XKDConfigError as exc:
        assert_one_line_naming_a_field(str(exc))
    else:
        assert ExperimentConfig.from_dict(config.to_dict()) == config


NUMBER_EDGES = [0, 0.0, -1, -1e-9, 1e308, 10**12, math.inf, -math.inf, math.nan, True, False, "1", None]
COUNT_EDGES = [0, -1, True, 2.0, "4", None]
# (valid-looking values, edge values) per field; widths stay tiny so a training step is cheap.
FIELDS = {
    "student.width": (st.integers(1, 4), COUNT_EDGES),
    "student.ae_width": (st.integers(1, 4), COUNT_EDGES),
    "student.ae_depth": (st.integers(1, 4), [0, -1, 5, True, 2.0]),
    "student.fusion": (st.sampled_from(list(FUSIONS)), ["add", 1, None]),
    "distill.method": (st.sampled_from(list(METHODS)), ["magic", None, 1]),
    "distill.temperature": (st.floats(0.1, 20), NUMBER_EDGES),
    "distill.alpha": (st.floats(0, 1), NUMBER_EDGES),
    "distill.beta": (st.floats(0, 100), NUMBER_EDGES),
    "distill.explanation_loss": (st.sampled_from(list(EXPLANATION_LOSSES)), ["l1", 0]),
    "distill.at_weight": (st.floats(0, 100), NUMBER_EDGES),
    "distill.e2kd_weight": (st.floats(0, 100), NUMBER_EDGES),
    "distill.head_warmup_epochs": (st.integers(0, 1), [-1, True, 10**9]),
    "distill.lr": (st.floats(1e-5, 1), NUMBER_EDGES),
    "distill.weight_decay": (st.floats(0, 1), NUMBER_EDGES),
    "distill.epochs": (st.integers(1, 2), [0, -1, True, 1.0, 10**9]),
    "distill.batch_size": (st.integers(1, 70) | st.sampled_from([12, 24, 48, 60]), [0, -1, True, 64.0, "64"]),
    "distill.seed": (st.integers(0, 2**31 - 1), [-1, 2**31, 2**64, True]),
    "data.image_size": (st.integers(8, 40) | st.sampled_from([8, 16, 24, 32]), [0, 7, -8, True, 16.0, "32"]),
    "ray.num_workers": (st.integers(0, 4), [-1, True, 1.0, "2"]),
}


@st.composite
def experiment_dicts(draw):
    """Plausible values everywhere (often consistent across fields, so configs with an
    explanation head or several workers get accepted too), then up to two edge values."""
    values = {name: draw(valid) for name, (valid, _) in FIELDS.items()}
    if draw(st.booleans()):  # an image the head's depth divides
        scale = 2 ** values["student.ae_depth"]
        values["data.image_size"] = scale * draw(st.integers(max(2, -(-8 // scale)), 48 // scale))
    if draw(st.booleans()):  # warm-up shorter than the run
        values["distill.epochs"] = values["distill.head_warmup_epochs"] + 1
    if draw(st.booleans()):  # a batch the workers divide
        values["distill.batch_size"] = max(values["ray.num_workers"], 1) * draw(st.integers(1, 16))
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=2, unique=True)):
        values[name] = draw(st.sampled_from(FIELDS[name][1]))
    raw: dict = {"teacher": {"width": 4}}
    for dotted, value in values.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    return raw


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(experiment_dicts())
def test_no_accepted_value_later_fails_inside_training(raw):
    """What ``from_dict`` accepts runs one real training step on one worker's share of a batch."""
    from xkd_ray.core.distill import build_student, make_optimizer, train_one_epoch
    from xkd_ray.core.models import build_teacher

    try:
        config = ExperimentConfig.from_dict(raw)
    except XKDConfigError as exc:
        assert_one_line_naming_a_field(str(exc))
        event(f"refused {str(exc).split(':')[0]}")
        return
    event(f"trained {config.distill.method}")
    per_worker = config.distill.batch_size // max(config.ray.num_workers, 1)
    size = config.data.image_size
    torch.manual_seed(config.distill.seed)
    student = build_student(config, types.SimpleNamespace(in_channels=1, num_classes=10))
    optimizer, scheduler = make_optimizer(config, student)
    teacher = None
    if METHODS[config.distill.method].needs_teacher:
        teacher = build_teacher(config.teacher.arch, 1, 10, config.teacher.width).eval()
    batch = TensorDataset(
        torch.randn(per_worker, 1, size, size),
        torch.randint(0, 10, (per_worker,)),
        torch.randn(per_worker, 10),
        torch.rand(per_worker, size, size),
    )
    losses = train_one_epoch(
        student, DataLoader(batch, batch_size=per_worker), optimizer, config, epoch=0, teacher=teacher
    )
    scheduler.step()
    assert "train_total" in losses
