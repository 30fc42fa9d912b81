"""Bring your own teacher: a torchvision resnet18 trained in plain torch, distilled from as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from tests.conftest import plain_torch_resnet18
from xkd_ray.config.schema import DataConfig
from xkd_ray.data.datasets import load_splits
from xkd_ray.ui.cli import main

SIZE = 32
TRAIN_IMAGES = 1000  # of mnist5k's training split: the teacher, its maps and the students, in a fraction of the time


@pytest.fixture(scope="module")
def user_teacher(tmp_path_factory) -> tuple[Path, Path, float]:
    """A resnet18 trained 1 epoch on mnist5k (5,000 real MNIST digits) in plain torch (only the data
    tensors come from xkd_ray, so both sides see the same split); grey images repeated to 3 channels,
    as documented."""
    splits = load_splits(DataConfig(dataset="mnist5k", image_size=SIZE, max_train_samples=TRAIN_IMAGES))
    model = plain_torch_resnet18(splits.train.images.repeat(1, 3, 1, 1), splits.train.labels)
    with torch.no_grad():
        predicted = model(splits.test.images.repeat(1, 3, 1, 1)).argmax(1)
    accuracy = float((predicted == splits.test.labels).float().mean())
    folder = tmp_path_factory.mktemp("teacher")
    torch.save(model.state_dict(), folder / "resnet18.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "resnet18.safetensors"))
    return folder / "resnet18.pt", folder / "resnet18.safetensors", accuracy


@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory) -> tuple[Path, Path]:
    """Valid resnet18 state_dicts for the refusals, which happen before any weight is used:
    10 classes (digits') and 7 classes."""
    folder = tmp_path_factory.mktemp("untrained")
    for classes in (10, 7):
        torch.save(
            torchvision.models.resnet18(weights=None, num_classes=classes).state_dict(), folder / f"{classes}.pt"
        )
    return folder / "10.pt", folder / "7.pt"


def _args(
    out: Path,
    cache: Path,
    weights: Path,
    *extra: str,
    method: str = "kd",
    dataset: str = "mnist5k",
    train_images: int = TRAIN_IMAGES,
) -> list[str]:
    sets = {
        "teacher.arch": "torchvision.resnet18",
        "teacher.weights": str(weights),
        "teacher.epochs": 50,  # would take minutes if it were (wrongly) trained
        "data.dataset": dataset,
        "data.image_size": SIZE,
        "data.max_train_samples": train_images,
        "distill.epochs": 1,
        "student.width": 8,
        "explain.cache_dir": str(cache),
        # What these tests check is the teacher (used as is, its accuracy, its maps), not the
        # faithfulness figures: those are tests/test_faithfulness.py's, on a small teacher.
        "faithfulness.road": "off",
        "faithfulness.mprt": False,
        "faithfulness.images": 32,
    }
    args = ["distill", "--method", method, "--out", str(out)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


@pytest.mark.slow  # end to end: trains a resnet18, explains digits with it, distils
@pytest.mark.parametrize(("kind", "method"), [("pt", "kd"), ("safetensors", "e2kd")])
def test_user_teacher_is_used_as_is(user_teacher, tmp_path, kind, method) -> None:
    pt, safetensors, accuracy = user_teacher
    weights = pt if kind == "pt" else safetensors
    out = tmp_path / method
    assert main(_args(out, tmp_path / "cache", weights, method=method)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher"]["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert not (tmp_path / "cache" / "teachers").exists()  # nothing trained or saved as a teacher


def test_wrong_class_count_is_refused_with_one_line(untrained_weights, tmp_path, capsys) -> None:
    seven = untrained_weights[1]
    assert main(_args(tmp_path / "kd", tmp_path / "cache", seven)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "teacher.weights" in error and "7-class" in error
    assert not (tmp_path / "kd").exists()


def test_wrong_explain_layer_lists_conv_layers(untrained_weights, tmp_path, capsys) -> None:
    args = _args(tmp_path / "kd", tmp_path / "cache", untrained_weights[0], "--set", "explain.layer=net.layer9")
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "explain.layer" in error and "net.layer4.1.conv2" in error


def test_unknown_torchvision_name_is_refused(tmp_path, capsys) -> None:
    assert (
        main(_args(tmp_path / "kd", tmp_path / "cache", tmp_path / "x.pt", "--set", "teacher.arch=torchvision.nope"))
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "teacher.arch" in error


@pytest.mark.slow  # end to end, like test_user_teacher_is_used_as_is
def test_imagenet_style_teacher_declares_its_input(tmp_path) -> None:
    """A resnet18 trained the ImageNet way (3 channels, 40 px, ImageNet's Normalize) in plain torch,
    from raw pixels; declared with teacher.input_size/mean/std, xkd_ray feeds it the same tensors
    from the student's 32 px digits, so its test accuracy is the one measured here."""
    size, mean, std = 40, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    train_images = 400  # of digits' ~1,150: a resnet18 at 40 px is the cost here, the check is its test accuracy
    splits = load_splits(DataConfig(image_size=SIZE, max_train_samples=train_images))
    scale = torch.tensor(splits.std).view(1, -1, 1, 1)
    shift = torch.tensor(splits.mean).view(1, -1, 1, 1)

    def imagenet_style(images: torch.Tensor) -> torch.Tensor:
        pixels = (images * scale + shift).repeat(1, 3, 1, 1)  # raw [0, 1] pixels, Grayscale(3)
        pixels = nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
        return torchvision.transforms.functional.normalize(pixels, mean, std)

    model = plain_torch_resnet18(imagenet_style(splits.train.images), splits.train.labels)
    with torch.no_grad():
        accuracy = float((model(imagenet_style(splits.test.images)).argmax(1) == splits.test.labels).float().mean())
    torch.save(model.state_dict(), tmp_path / "imagenet_style.pt")
    contract = ["--set", f"teacher.input_size={size}", "--set", f"teacher.mean={mean}", "--set", f"teacher.std={std}"]
    out = tmp_path / "kd"
    weights = tmp_path / "imagenet_style.pt"
    assert main(_args(out, tmp_path / "cache", weights, *contract, dataset="digits", train_images=train_images)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher"]["test_accuracy"] == pytest.approx(accuracy, abs=1.5 / len(splits.test.labels))
    maps = list((tmp_path / "cache" / "explanations").glob("teacher-test-*.parquet"))
    assert len(maps) == 1  # cached at the student's size (read back and checked against the split)
