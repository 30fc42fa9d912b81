"""Model shapes for every head depth, fusion modes, and the teachers on small images."""

import json

import pytest
import torch

from xkd_ray.core.models import ConvAutoencoder, ResNet18Teacher, StudentNet, VGGTeacher, find_layer, parameter_count
from xkd_ray.errors import XKDCheckpointError, XKDConfigError


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 3])
def test_autoencoder_output_shape_for_every_depth(depth, channels):
    head = ConvAutoencoder(channels, depth=depth, width=8)
    maps = head(torch.randn(2, channels, 32, 32))
    assert maps.shape == (2, 1, 32, 32)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


@pytest.mark.parametrize("fusion", ["concat", "gate"])
def test_student_with_head_returns_logits_maps_and_features(fusion):
    student = StudentNet(3, 7, width=8, ae_depth=2, fusion=fusion)
    output = student(torch.randn(4, 3, 32, 32), return_all=True)
    assert output.logits.shape == (4, 7)
    assert output.maps.shape == (4, 32, 32)
    assert [f.shape[-1] for f in output.features] == [32, 16, 8]
    assert student(torch.randn(4, 3, 32, 32)).shape == (4, 7)  # plain forward: logits only


@pytest.mark.parametrize("fusion", ["concat", "gate"])
def test_fused_map_changes_the_prediction(fusion):
    """The head is not a side branch: its map feeds the classifier (with either fusion)."""
    torch.manual_seed(0)
    student = StudentNet(1, 10, width=8, ae_depth=1, fusion=fusion).eval()
    x = torch.randn(2, 1, 32, 32)
    before = student(x)
    with torch.no_grad():
        student.head.output.bias.fill_(5.0)
    assert not torch.allclose(before, student(x))


@pytest.mark.parametrize(
    "architecture",
    [
        {"in_channels": 1, "num_classes": 10, "width": 8, "ae_depth": None, "ae_width": 8, "fusion": "concat"},
        {"in_channels": 1, "num_classes": 10, "width": 8, "ae_depth": 1, "ae_width": 8, "fusion": "concat"},
        {"in_channels": 3, "num_classes": 7, "width": 8, "ae_depth": 2, "ae_width": 4, "fusion": "gate"},
        {"in_channels": 1, "num_classes": 10, "width": 8, "ae_depth": 3, "ae_width": 8, "fusion": "gate"},
        {"in_channels": 3, "num_classes": 5, "width": 4, "ae_depth": 4, "ae_width": 8, "fusion": "concat"},
    ],
    ids=lambda a: f"depth{a['ae_depth']}-{a['fusion']}-c{a['in_channels']}",
)
def test_student_rebuilds_from_its_architecture(architecture):
    """A checkpoint holds only the JSON architecture and the weights: the rebuilt clone must be
    the same function (same logits, same head maps), not merely the same parameter count."""
    torch.manual_seed(0)
    student = StudentNet(**architecture)
    with torch.no_grad():  # norm affines start at 1/0: make every parameter matter to the output
        for parameter in student.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    saved = json.loads(json.dumps(student.architecture()))  # what a checkpoint stores
    assert saved == architecture

    torch.manual_seed(1)  # the clone starts from different random weights
    clone = StudentNet.from_architecture(saved)
    assert clone.architecture() == student.architecture()
    x = torch.randn(3, architecture["in_channels"], 32, 32)
    student.eval()
    clone.eval()
    with torch.no_grad():
        expected = student(x, return_all=True)
        assert not torch.allclose(clone(x), expected.logits)  # the comparison below can fail
        clone.load_state_dict(student.state_dict())
        got = clone(x, return_all=True)
    assert torch.equal(got.logits, expected.logits)
    if architecture["ae_depth"] is None:
        assert got.maps is None and expected.maps is None
    else:
        assert got.maps.shape == (3, 32, 32)
        assert torch.equal(got.maps, expected.maps)
    with pytest.raises(XKDCheckpointError, match="student architecture"):
        StudentNet.from_architecture({**saved, "unknown_key": 1})


def _output_of(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    assert len(captured) == 1
    return captured[0]


def test_teachers_are_larger_than_students_and_have_explain_layers():
    torch.manual_seed(0)
    vgg, resnet = VGGTeacher(1, 10, width=32).eval(), ResNet18Teacher(3, 10).eval()
    assert vgg(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert parameter_count(vgg) > 5 * parameter_count(StudentNet(1, 10, width=16))

    # VGG: the last conv stage, still a grid fine enough for Grad-CAM (>= 8x8 on 32x32 inputs).
    x = torch.randn(2, 1, 32, 32)
    vgg_layer = find_layer(vgg, None)
    assert vgg_layer is vgg.stage3
    vgg_maps = _output_of(vgg, vgg_layer, x)
    assert vgg_maps.shape[0] == 2 and vgg_maps.shape[-2] >= 8 and vgg_maps.shape[-1] >= 8
    with torch.no_grad():
        assert torch.equal(vgg_maps, vgg.stages(x)[-1])  # it is what the classifier reads

    # resnet18: with the 3x3 stride-1 stem and no max-pool, layer4 is 4x4 on 32x32 (not 1x1).
    y = torch.randn(2, 3, 32, 32)
    resnet_layer = find_layer(resnet, None)
    assert resnet_layer is resnet.net.layer4
    assert tuple(_output_of(resnet, resnet_layer, y).shape[-2:]) == (4, 4)

    assert find_layer(resnet, "net.layer3") is resnet.net.layer3  # dotted names
    student = StudentNet(1, 10, width=8)
    assert find_layer(student, None) is student.stage3
    with pytest.raises(XKDConfigError, match=r"explain\.layer: no layer 'stage9'"):
        find_layer(vgg, "stage9")
