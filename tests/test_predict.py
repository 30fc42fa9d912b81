"""A saved student applied to raw images: scikit-learn's own 8x8 digits, PIL images, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from xkd_ray.core.distill import distill, save_student, student_predictions
from xkd_ray.core.models import StudentNet
from xkd_ray.data.splits import count_for, take
from xkd_ray.errors import XKDCheckpointError, XKDDataError
from xkd_ray.student.predict import Student, load_student_folder
from xkd_ray.student.preprocessing import FILE, Explanation, Preprocessing


@pytest.fixture(scope="module")
def saved(tiny_config, tiny_data, tmp_path_factory):
    config = tiny_config.with_overrides({"distill.method": "xd"})
    student, metrics = distill(config, tiny_data, progress=False)
    return save_student(tmp_path_factory.mktemp("predict") / "xd", config, student, tiny_data, metrics), config


def raw_test_digits(config) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's original test images (8x8, ink 0..16), the test split's indices recomputed
    the way ``datasets._load_digits`` draws them."""
    bunch = load_digits()
    total = len(bunch.target)
    test, _ = take(np.arange(total), bunch.target, count_for(config.data.test_fraction, total), config.data.seed)
    return bunch.images[test].astype(np.uint8), bunch.target[test]


def test_raw_digits_give_the_internal_evaluation_exactly(saved, tiny_data) -> None:
    folder, config = saved
    student = load_student_folder(folder)
    raw, labels = raw_test_digits(config)
    assert np.array_equal(labels, tiny_data.splits.test.labels.numpy())  # the same images, in the same order
    assert raw.shape[1:] == (8, 8) and raw.max() == 16  # unresized, unstandardised

    result = student.predict(raw)
    internal = student_predictions(
        student.model, tiny_data.splits.test.images, tiny_data.teacher_outputs["test"].predictions, config
    )
    assert torch.equal(result.labels, internal.logits.argmax(dim=1))
    assert torch.equal(result.probabilities, torch.softmax(internal.logits, dim=1))
    accuracy = (result.labels == torch.as_tensor(labels)).float().mean().item()
    assert accuracy == pytest.approx(json.loads((folder / "metrics.json").read_text())["test"]["accuracy"])
    assert result.class_names == [str(label) for label in result.labels.tolist()]
    assert result.map_kind == "head" and len(result.maps) == len(raw)
    assert all(m.shape == (8, 8) and 0 <= m.min() and m.max() <= 1 for m in result.maps)  # input resolution
    assert torch.equal(torch.stack(result.maps), student.explain(raw))


def test_layouts_files_and_pil_agree(saved, tmp_path) -> None:
    folder, config = saved
    student = load_student_folder(folder)
    raw, _ = raw_test_digits(config)
    batch = student.predict(raw[:3])
    one = raw[0]
    for variant in (one, one[:, :, None], one[None, None], torch.as_tensor(one).float(), [one]):
        # Another batch size may change the last bits of a convolution, never more.
        assert torch.allclose(student.predict(variant).logits[0], batch.logits[0], atol=1e-6)
    assert torch.allclose(student.predict(one / 16.0, pixel_max=1.0).logits[0], batch.logits[0])
    # A file of another size: 8-bit, so divided by 255; the map comes back at the file's size.
    image = Image.fromarray((one * 255 // 16).astype(np.uint8)).resize((40, 30))
    image.save(tmp_path / "digit.png")
    from_file = student.predict([str(tmp_path / "digit.png"), image])
    assert torch.equal(from_file.logits[0], from_file.logits[1])
    assert [tuple(m.shape) for m in from_file.maps] == [(30, 40), (30, 40)]
    # An RGB image to this grey student: converted with the luma weights, as PIL's "L" does.
    rgb = Image.merge("RGB", [image, image.point(lambda v: v // 2), image])
    assert torch.allclose(student.predict(rgb).logits, student.predict(rgb.convert("L")).logits, atol=1e-4)


def test_grey_input_to_an_rgb_student_and_posthoc_maps(tmp_path) -> None:
    torch.manual_seed(0)
    prep = Preprocessing(
        image_size=16, channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), pixel_max=255.0,
        resize="pil_bilinear", class_names=("cat", "dog"), explanation=Explanation(kind="gradcam"),
    )  # fmt: skip
    student = Student(StudentNet(3, 2, width=8).eval(), {}, {}, tmp_path, prep)
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8))
    from_grey = student.predict(grey)
    assert torch.equal(from_grey.logits, student.predict(grey.convert("RGB")).logits)
    assert from_grey.class_names[0] in ("cat", "dog") and from_grey.map_kind == "gradcam"
    assert from_grey.maps[0].shape == (20, 24) and 0.5 < float(from_grey.maps[0].max()) <= 1.0
    assert student.predict(np.asarray(grey)).logits.shape == (1, 2)  # a grey array, repeated to 3 channels


def test_old_folders_and_bad_inputs_are_refused(saved, tmp_path) -> None:
    folder, _ = saved
    student = load_student_folder(folder)
    (tmp_path / "noise.png").write_bytes(b"not an image at all")
    for bad, message in (
        (str(tmp_path / "noise.png"), "cannot read image"),
        (str(tmp_path / "missing.png"), "not found"),
        (np.zeros((2, 5, 7, 9)), "is not an image"),
        (np.array([["a"]]), "not a number type"),
        (np.full((8, 8), np.nan), "NaN"),
        ([], "no input images"),
        ({"a": 1}, "cannot read an image from a dict"),
    ):
        with pytest.raises(XKDDataError, match=message):
            student.predict(bad)
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.pt", "config.json", "metrics.json"):
        (old / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(XKDCheckpointError, match=f"no {FILE}.*xkd upgrade"):
        load_student_folder(old)
    assert (folder / "card.md").read_text().count("fidelity_skill") == 1


def test_cli_predict_export_and_upgrade(saved, tmp_path, capsys) -> None:
    from xkd_ray.ui.cli import main

    folder, config = saved
    raw, _ = raw_test_digits(config)
    files = []
    for index in range(3):
        files.append(tmp_path / f"d{index}.png")
        Image.fromarray((raw[index] * 255 // 16).astype(np.uint8)).save(files[-1])
    assert main(["predict", str(folder), *map(str, files), "--json", "--maps", str(tmp_path / "maps.png")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    expected = load_student_folder(folder).predict([str(f) for f in files])
    assert [line["label"] for line in lines] == expected.labels.tolist()
    assert [line["file"] for line in lines] == [str(f) for f in files]
    assert Image.open(tmp_path / "maps.png").size[0] > 100  # the grid of images and maps

    assert main(["export", str(folder), "--format", "onnx", "--out", str(tmp_path / "s.onnx")]) == 0
    assert (tmp_path / "s.onnx").stat().st_size > 1000 and "head_map" in capsys.readouterr().out
    assert main(["export", str(folder), "--format", "onnx", "--out", str(tmp_path)]) == 2  # a folder
    assert "is a folder" in capsys.readouterr().err

    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.pt", "config.json", "metrics.json"):
        (old / name).write_bytes((folder / name).read_bytes())
    assert main(["predict", str(old), str(files[0])]) == 2
    assert "xkd upgrade" in capsys.readouterr().err
    assert main(["upgrade", str(old)]) == 0
    assert (old / FILE).read_text() == (folder / FILE).read_text()  # recovered from the data its config names
    assert main(["predict", str(old), str(files[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["label"] == int(expected.labels[0])


def test_front_members_stay_self_contained(saved, tmp_path) -> None:
    """A trial's student copied onto the front keeps its preprocessing, and its card names the front."""
    from xkd_ray.pareto.front import open_student, record_trial, update_registry

    folder, _ = saved
    metrics = json.loads((folder / "metrics.json").read_text())
    row = {"trial_id": "t0", "method": "xd", "status": "ok", "config": {}, "student_dir": str(folder)}
    record_trial(tmp_path, {**row, **{f"val_{k}": v for k, v in metrics["val"].items()}})
    update_registry(tmp_path, lambda model, record: metrics["test"])
    member = tmp_path / "pareto" / "t0"
    assert (member / FILE).read_text() == (folder / FILE).read_text()
    assert "Pareto front of" in (member / "card.md").read_text()
    knee = open_student(tmp_path, "knee")
    raw, _ = raw_test_digits(saved[1])
    assert torch.equal(knee.predict(raw[:5]).logits, load_student_folder(folder).predict(raw[:5]).logits)
