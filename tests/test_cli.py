"""The `xkd` command: a real run writes its three files; bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_OVERRIDES
from xkd_ray.ui.cli import main


def _sets(overrides: dict) -> list[str]:
    args: list[str] = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture()
def tiny_args(cache_dir) -> list[str]:
    return _sets({**TINY_OVERRIDES, "explain.cache_dir": cache_dir})


def test_distill_writes_model_config_and_metrics(tiny_args, tiny_data, tmp_path, capsys):
    out = tmp_path / "kd"
    assert main(["distill", "--method", "kd", "--out", str(out), *tiny_args]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "card.md",
        "config.json",
        "metrics.json",
        "model.pt",
        "preprocessing.json",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test", "teacher"}
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "saved to" in capsys.readouterr().out


def _assert_refused(argv: list[str], out, capsys, expected: str) -> None:
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert expected in error, error
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"distill.temperature": 0}, "distill.temperature"),
        ({"distill.alpha": 1.5}, "distill.alpha"),
        ({"explain.explainer": "lime"}, "explain.explainer"),
        ({"data.dataset": "imagenet"}, "data.dataset"),
        ({"data.image_size": 16, "student.ae_depth": 4}, "student.ae_depth"),
    ],
)
def test_bad_config_values_exit_2_naming_the_field(overrides, expected, tmp_path, capsys):
    out = tmp_path / "out"
    _assert_refused(["distill", "--method", "xd", "--out", str(out), *_sets(overrides)], out, capsys, expected)


def test_unknown_method_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--method", "magic", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_missing_data_root_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["distill", "--method", "kd", "--out", str(out), "--set", "data.dataset=mnist"]
    _assert_refused([*argv, "--data-root", str(tmp_path / "nowhere")], out, capsys, "nowhere")


def test_a_data_root_for_a_dataset_that_reads_none_is_refused(tmp_path, capsys):
    """Before, `--data-root DIR` without naming the dataset trained on the embedded digits and
    ignored DIR without a word."""
    out = tmp_path / "out"
    argv = ["distill", "--method", "kd", "--out", str(out), "--data-root", str(tmp_path)]
    _assert_refused(argv, out, capsys, "data.root: dataset 'digits' reads no folder")


def test_a_set_key_given_twice_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["distill", "--method", "kd", "--out", str(out), "--set", "distill.lr=1e-3", "--set", "distill.lr=0.1"]
    _assert_refused(argv, out, capsys, "--set distill.lr: given twice")


@pytest.mark.parametrize("command", ["teacher", "distill", "demo"])
def test_every_command_checks_its_output_before_training(command, tmp_path, capsys):
    """A file where a folder must go is refused before any training (before, `xkd distill`
    trained to the end and then lost the student to a FileExistsError)."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    argv = [command, "--set", f"explain.cache_dir={blocker / 'cache'}"]
    argv += ["--method", "kd", "--out", str(tmp_path / "out")] if command == "distill" else []
    argv += ["--out", str(tmp_path / "out")] if command == "demo" else []
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "afile exists and is not a folder" in error and len(error.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_corrupt_teacher_checkpoint_is_refused(tiny_args, tmp_path, capsys):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    out = tmp_path / "out"
    argv = ["distill", "--method", "kd", "--out", str(out), *tiny_args, "--set", f"teacher.checkpoint={bad}"]
    _assert_refused(argv, out, capsys, "teacher.pt: not a loadable weights file")


def test_mismatched_teacher_checkpoint_is_refused(tiny_args, tiny_data, tmp_path, capsys):
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    out = tmp_path / "out"
    argv = ["distill", "--method", "kd", "--out", str(out), *tiny_args, "--set", f"teacher.checkpoint={wrong}"]
    _assert_refused(argv, out, capsys, "do not match the configured architecture")


def test_malicious_pickle_never_runs(tiny_args, tmp_path, capsys):
    """weights_only=True refuses pickled code: the payload's side effect must not happen."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"weight": Payload()}, evil)
    out = tmp_path / "out"
    argv = ["distill", "--method", "kd", "--out", str(out), *tiny_args, "--set", f"teacher.checkpoint={evil}"]
    _assert_refused(argv, out, capsys, "evil.pt: not a loadable weights file")
    assert not marker.exists()


@pytest.fixture(scope="module")
def saved_student(tiny_config, tiny_data, tmp_path_factory):
    from xkd_ray.core.distill import distill, save_student

    config = tiny_config.with_overrides({"distill.epochs": 1})
    student, metrics = distill(config, tiny_data, progress=False)
    return save_student(tmp_path_factory.mktemp("student") / "xd", config, student, tiny_data, metrics)


def test_evaluate_remeasures_a_saved_student(saved_student, capsys):
    """The printed table holds, metric by metric, the test metrics stored when the student was saved
    ("n/i" where the stored teacher-vs-random evidence says the curve cannot rank maps)."""
    from xkd_ray.core.faithfulness_metrics import curve_of, informative_in
    from xkd_ray.core.metrics import METRICS
    from xkd_ray.pareto.display import NOT_INFORMATIVE_CELL

    assert main(["evaluate", str(saved_student)]) == 0
    stored = json.loads((saved_student / "metrics.json").read_text())["test"]
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == 2 and cells[0] in METRICS:
            printed[cells[0]] = cells[1]

    def shown(name, value):
        if value is None:
            return "-"
        curve = curve_of(name)  # a student's AUC under a curve that cannot tell the teacher from random
        own = name.endswith(("_head", "_posthoc", "_random")) and METRICS[name].error_of is None
        if curve and own and informative_in(stored, curve) is False:
            return NOT_INFORMATIVE_CELL
        if not isinstance(value, float):
            return str(value)
        return f"{value:.3f}" + (" *" if name.endswith("_skill") and value <= 0 else "")

    exact = [name for name, metric in METRICS.items() if metric.exact]  # latency is re-timed
    assert {name: printed[name] for name in exact} == {name: shown(name, stored[name]) for name in exact}
    assert set(printed) == set(METRICS)


def _rewrite_architecture(folder, **changes) -> None:
    record = json.loads((folder / "config.json").read_text())
    record["architecture"].update(changes)
    (folder / "config.json").write_text(json.dumps(record))


STUDENT_FOLDER_PROBLEMS = {
    "missing weights": (lambda f: (f / "model.pt").unlink(), "model.pt: checkpoint file not found"),
    "truncated weights": (
        lambda f: (f / "model.pt").write_bytes((f / "model.pt").read_bytes()[:200]),
        "model.pt: not a loadable weights file",
    ),
    "pickle that is not a state_dict": (
        lambda f: torch.save([torch.zeros(3)], f / "model.pt"),
        "model.pt: expected a state_dict",
    ),
    "wrong architecture": (
        lambda f: _rewrite_architecture(f, width=16),
        "model.pt: weights do not match the configured architecture",
    ),
    "impossible architecture": (lambda f: _rewrite_architecture(f, width=-3), "config.json: student architecture"),
    "missing config": (lambda f: (f / "config.json").unlink(), "config.json: file not found"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{oops"), "config.json: not valid JSON"),
}


@pytest.mark.parametrize("problem", sorted(STUDENT_FOLDER_PROBLEMS))
def test_broken_student_folder_is_one_clear_error(problem, saved_student, tmp_path, capsys):
    """CLI: exit 2 and one line naming the file; Python API: XKDCheckpointError, same message."""
    import shutil

    from xkd_ray.core.checkpoints import load_student
    from xkd_ray.errors import XKDCheckpointError

    folder = tmp_path / "student"
    shutil.copytree(saved_student, folder)
    breaks, expected = STUDENT_FOLDER_PROBLEMS[problem]
    breaks(folder)
    assert main(["evaluate", str(folder)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and expected in error, error
    with pytest.raises(XKDCheckpointError) as raised:
        load_student(folder)
    assert error == f"xkd: error: {raised.value}"


def test_unusable_out_folder_is_refused_before_training(tmp_path, capsys):
    """A path under a file can never hold the student: refused at once, not after training."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["distill", "--method", "kd", "--out", str(blocker / "sub")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "afile exists and is not a folder" in error, error
    assert blocker.read_text() == "x"
