"""The teacher's input contract (teacher.input_size / mean / std): conversion, maps, keys, defaults."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_OVERRIDES
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.checkpoints import stable_hash
from xkd_ray.core.explain import explain_batch, explain_maps, explain_settings
from xkd_ray.core.models import build_teacher, predict_logits
from xkd_ray.core.prepared import prepare
from xkd_ray.core.teacher import teacher_id, teacher_input
from xkd_ray.core.teacher_input import TeacherInput, resize_maps, student_view, to_teacher
from xkd_ray.data.datasets import load_splits
from xkd_ray.data.splits import SPLIT_NAMES
from xkd_ray.errors import XKDConfigError

CONTRACT = {"teacher.input_size": 24, "teacher.mean": [0.5], "teacher.std": [0.25]}


def test_to_teacher_matches_a_hand_computation() -> None:
    images = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]]])  # student-standardised, mean 0.2, std 0.1
    pixels = [[0.3, 0.1], [0.2, 0.4]]  # x * 0.1 + 0.2
    same_size = to_teacher(images, [0.2], [0.1], 2, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert same_size.shape == (1, 3, 2, 2)  # grey meets 3-channel statistics as 3 channels
    for channel, (mean, std) in enumerate(zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], strict=True)):
        expected = torch.tensor([[(value - mean) / std for value in row] for row in pixels])
        torch.testing.assert_close(same_size[0, channel], expected)
    flat = to_teacher(torch.full((2, 1, 5, 5), 3.0), [0.2], [0.1], 16, [0.5], [0.25])
    torch.testing.assert_close(flat, torch.full((2, 1, 16, 16), (0.5 - 0.5) / 0.25))  # constant stays constant
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    resized = to_teacher(ramp, [0.0], [1.0], 4, [0.0], [1.0])
    by_hand = F.interpolate(ramp, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(resized, by_hand)
    rgb = torch.randn(2, 3, 8, 8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    assert torch.equal(TeacherInput(mean, std, 8, 8, mean, std)(rgb), rgb)  # the identity touches nothing


def test_contract_is_validated_with_one_line_naming_the_field() -> None:
    base = ExperimentConfig()
    problems = {
        "teacher.std": ([0.2, 0.0, 0.1], "teacher.std[1]: got 0.0; must be > 0"),
        "teacher.mean": ([0.1, 0.2], "teacher.mean: got 2 values; give 1 (all channels) or 3 (RGB)"),
        "teacher.input_size": (4, "teacher.input_size: got 4; must be >= 8"),
    }
    for key, (value, message) in problems.items():
        with pytest.raises(XKDConfigError) as error:
            base.with_overrides({key: value})
        assert str(error.value) == message
    with pytest.raises(XKDConfigError, match=r"^teacher.mean\[0\]: got nan; must be finite$"):
        base.with_overrides({"teacher.mean": [float("nan")]})
    # Channels are checked against the data: digits are grey, a vgg teacher gets 1 channel.
    three = base.with_overrides({"data.image_size": 16, "teacher.mean": [0.1, 0.2, 0.3]})
    with pytest.raises(XKDConfigError, match=r"^teacher.mean: got 3 values; the data has 1 channel, so give 1$"):
        teacher_input(three, load_splits(three.data))
    torchvision = three.with_overrides({"teacher.arch": "torchvision.resnet18"})  # fed 3 channels either way
    assert teacher_input(torchvision, load_splits(torchvision.data)).teacher_mean == (0.1, 0.2, 0.3)


def _untrained_teacher(config: ExperimentConfig, splits) -> torch.nn.Module:
    from xkd_ray.core.teacher import teacher_architecture

    torch.manual_seed(0)
    return build_teacher(**teacher_architecture(config, splits)).eval()


def test_defaults_keep_the_student_input_and_the_old_keys() -> None:
    config = ExperimentConfig().with_overrides(TINY_OVERRIDES)
    splits = load_splits(config.data)
    inputs = teacher_input(config, splits)
    assert inputs.identity and config.teacher.contract() == {}
    teacher = _untrained_teacher(config, splits)
    assert student_view(teacher, inputs) is teacher  # the teacher runs on the very same tensors
    images = splits.val.images[:16]
    for explainer in ("gradcam", "integrated_gradients"):
        settings = explain_settings(explainer, None, 4, 1.0)
        plain, declared = explain_batch(teacher, images, settings), explain_batch(teacher, images, settings, inputs)
        assert torch.equal(plain[0], declared[0]) and torch.equal(plain[1], declared[1])
    # The teacher id is the formula from before the contract existed, so existing caches stay valid.
    old = {k: v for k, v in config.to_dict()["teacher"].items() if k not in ("checkpoint", "weights")}
    old = {k: v for k, v in old.items() if k not in ("input_size", "mean", "std")}
    assert teacher_id(config, splits) == stable_hash({"teacher": old, "data": splits.fingerprint()})
    assert teacher_id(config.with_overrides(CONTRACT), splits) != teacher_id(config, splits)


def test_teacher_at_its_own_size_gives_maps_at_the_student_size(tmp_path) -> None:
    small = {**TINY_OVERRIDES, "data.max_train_samples": 200, "teacher.epochs": 1}
    config = ExperimentConfig().with_overrides({**small, **CONTRACT, "explain.cache_dir": str(tmp_path)})
    data = prepare(config, progress=False)
    splits = data.splits
    assert data.teacher_id == teacher_id(config, splits) and not data.teacher_input.identity
    teacher = data.teacher()
    mean, std = torch.tensor(splits.mean).view(1, -1, 1, 1), torch.tensor(splits.std).view(1, -1, 1, 1)
    for name in SPLIT_NAMES:
        outputs, images = data.teacher_outputs[name], splits.split(name).images
        assert outputs.maps.shape[-2:] == (16, 16) and outputs.logits.shape == (len(images), 10)
        by_hand = F.interpolate(images * std + mean, size=(24, 24), mode="bilinear", antialias=True)
        by_hand = (by_hand - 0.5) / 0.25
        torch.testing.assert_close(outputs.logits, predict_logits(teacher, by_hand), rtol=1e-5, atol=1e-5)
    val = splits.val.images[:8]
    hand = (F.interpolate(val * std + mean, size=(24, 24), mode="bilinear", antialias=True) - 0.5) / 0.25
    at_teacher_size = explain_maps(teacher, hand).maps
    assert at_teacher_size.shape[-2:] == (24, 24)
    torch.testing.assert_close(data.teacher_outputs["val"].maps[:8], resize_maps(at_teacher_size, (16, 16)))
    accuracy = (data.teacher_outputs["test"].predictions == splits.test.labels).float().mean().item()
    assert data.teacher_metrics["test_accuracy"] == pytest.approx(accuracy)
    # A method on the live teacher's features feeds it the converted batch as well.
    live = data.live_teacher(config.with_overrides({"distill.method": "at"}))
    for ours, theirs in zip(live.stages(val), teacher.stages(hand), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_declared_contract_changes_given_weights_key(tmp_path) -> None:
    from xkd_ray.core.teacher import cached_teacher

    config = ExperimentConfig().with_overrides(TINY_OVERRIDES)
    splits = load_splits(config.data)
    weights = tmp_path / "vgg.pt"
    torch.save(_untrained_teacher(config, splits).state_dict(), weights)
    given = config.with_overrides({"teacher.weights": str(weights)})
    plain = cached_teacher(given, splits)
    declared = cached_teacher(given.with_overrides({"teacher.input_size": 24}), splits)
    assert plain.teacher_id != declared.teacher_id
    view = student_view(declared.model, teacher_input(given.with_overrides({"teacher.input_size": 24}), splits))
    assert declared.metrics["test_accuracy"] == pytest.approx(
        (predict_logits(view, splits.test.images).argmax(1) == splits.test.labels).float().mean().item()
    )
