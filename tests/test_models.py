"""Model shapes for every head depth, fusion modes, and the teachers on small images."""

import pytest
import torch

from xkd_ray.errors import XKDConfigError
from xkd_ray.models import ConvAutoencoder, ResNet18Teacher, StudentNet, VGGTeacher, find_layer, parameter_count


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


def test_fused_map_changes_the_prediction():
    """The head is not a side branch: its map feeds the classifier."""
    torch.manual_seed(0)
    student = StudentNet(1, 10, width=8, ae_depth=1).eval()
    x = torch.randn(2, 1, 32, 32)
    before = student(x)
    with torch.no_grad():
        student.head.output.bias.fill_(5.0)
    assert not torch.allclose(before, student(x))


def test_student_rebuilds_from_its_architecture():
    student = StudentNet(1, 10, width=8, ae_depth=3, fusion="gate")
    clone = StudentNet.from_architecture(student.architecture())
    clone.load_state_dict(student.state_dict())
    assert parameter_count(clone) == parameter_count(student)


def test_teachers_are_larger_than_students_and_have_explain_layers():
    vgg, resnet = VGGTeacher(1, 10, width=32), ResNet18Teacher(3, 10)
    assert vgg(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert parameter_count(vgg) > 5 * parameter_count(StudentNet(1, 10, width=16))
    assert isinstance(find_layer(vgg, None), torch.nn.Module)
    assert find_layer(resnet, None) is resnet.net.layer4
    with pytest.raises(XKDConfigError, match=r"explain\.layer: no layer 'stage9'"):
        find_layer(vgg, "stage9")
