"""Teacher CNNs, the student classifier and its explanation head.

Every model can be rebuilt from a small JSON-able ``architecture`` dict, which is saved next
to its weights so a checkpoint never needs the experiment config (or pickled code) to load.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
from torch import nn

from xkd_ray.config.registries import FUSIONS, TEACHERS
from xkd_ray.errors import XKDCheckpointError, XKDConfigError


def conv_block(in_channels: int, out_channels: int, stride: int = 1, norm: str = "batch") -> nn.Sequential:
    """3x3 conv + norm + ReLU. Students use GroupNorm: their training is sharded over DDP
    workers, and per-shard BatchNorm statistics would make the result depend on the worker
    count (SyncBatchNorm runs on GPUs only)."""
    normalisation = (
        nn.BatchNorm2d(out_channels) if norm == "batch" else nn.GroupNorm(_groups(out_channels), out_channels)
    )
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        normalisation,
        nn.ReLU(inplace=False),
    )


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class VGGTeacher(nn.Module):
    """A small VGG-style CNN: three stages of two 3x3 convs; the default teacher.

    The last conv block keeps an 8x8 grid on 32x32 inputs, fine enough for Grad-CAM to
    say *where* the evidence is.
    """

    default_explain_layer = "stage3"

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(conv_block(in_channels, width), conv_block(width, width))
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), conv_block(width, 2 * width), conv_block(2 * width, 2 * width))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), conv_block(2 * width, 4 * width), conv_block(4 * width, 4 * width))
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * width, num_classes)
        )

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs, the feature maps attention transfer matches."""
        first = self.stage1(x)
        second = self.stage2(first)
        return [first, second, self.stage3(second)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stages(x)[-1])


class ResNet18Teacher(nn.Module):
    """torchvision's resnet18, trained from scratch, with a 3x3 stem and no max-pool.

    The ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32x32 image to 8x8 before
    the first block, leaving Grad-CAM a 1x1 grid at ``layer4``.
    """

    default_explain_layer = "net.layer4"

    def __init__(self, in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        del width  # resnet18's widths are fixed by torchvision
        import torchvision  # here, not at the top: it costs every student process ~1.5 s (torch._dynamo)

        self.net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net.layer1(net.relu(net.bn1(net.conv1(x))))
        second = net.layer2(x)
        third = net.layer3(second)
        return [second, third, net.layer4(third)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(self.net.avgpool(self.stages(x)[-1]), 1))


# How the head's map enters the classifier (see ``StudentNet``).


class TorchvisionTeacher(nn.Module):
    """Any torchvision classification model, as its user trained it (``teacher.arch: torchvision.<name>``).

    Its state_dict is the bare torchvision model's (``self.net`` is saved/loaded directly), so a
    file from ``torch.save(model.state_dict())`` loads as is. Grey images (1 channel) are repeated
    to the 3 channels torchvision's stems expect, the usual way to feed grey data to them.
    """

    def __init__(self, name: str, in_channels: int, num_classes: int) -> None:
        super().__init__()
        import torchvision  # here, not at the top: it costs every student process ~1.5 s (torch._dynamo)

        self.net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        self.repeat = 3 if in_channels == 1 else 1
        self.default_explain_layer = "net." + last_conv_name(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.repeat(1, self.repeat, 1, 1) if self.repeat > 1 and x.shape[1] == 1 else x)


def conv_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def last_conv_name(model: nn.Module) -> str:
    names = conv_layer_names(model)
    if not names:
        raise XKDConfigError("explain.layer: the teacher has no Conv2d layer; name the layer to explain")
    return names[-1]


def build_teacher(arch: str, in_channels: int, num_classes: int, width: int) -> nn.Module:
    if arch.startswith("torchvision."):
        return TorchvisionTeacher(arch.removeprefix("torchvision."), in_channels, num_classes)
    if arch not in TEACHERS:
        raise XKDConfigError(f"teacher.arch: got {arch!r}; allowed values are {', '.join(TEACHERS)}")
    return TEACHERS[arch](in_channels, num_classes, width)


def find_layer(model: nn.Module, name: str | None) -> nn.Module:
    """The module to explain: ``name`` (dotted path), the model's default stage, or its last Conv2d."""
    name = name or getattr(model, "default_explain_layer", None) or last_conv_name(model)
    try:
        return model.get_submodule(name)
    except AttributeError:
        convs = conv_layer_names(model)
        shown = ", ".join(convs[-8:]) if convs else "none"
        raise XKDConfigError(
            f"explain.layer: no layer {name!r}; candidate conv layers (last {min(len(convs), 8)}): {shown}"
        ) from None


class ConvAutoencoder(nn.Module):
    """The explanation head: image -> map in [0, 1] at input resolution.

    ``depth`` stride-2 conv blocks down, mirrored transposed convs up; the sigmoid keeps the
    map in the teacher maps' range.
    """

    def __init__(self, in_channels: int, depth: int = 2, width: int = 16) -> None:
        super().__init__()
        if depth < 1:
            raise XKDConfigError(f"student.ae_depth: got {depth}; must be >= 1")
        channels = [in_channels] + [width * 2**level for level in range(depth)]
        self.encoder = nn.Sequential(
            *[conv_block(channels[i], channels[i + 1], stride=2, norm="group") for i in range(depth)]
        )
        decoder: list[nn.Module] = []
        for level in range(depth, 0, -1):
            out_channels = channels[level - 1] if level > 1 else width
            decoder += [
                nn.ConvTranspose2d(channels[level], out_channels, 4, stride=2, padding=1, bias=False),
                nn.GroupNorm(_groups(out_channels), out_channels),
                nn.ReLU(inplace=False),
            ]
        self.decoder = nn.Sequential(*decoder)
        self.output = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.output(self.decoder(self.encoder(x))))


class StudentOutput(NamedTuple):
    logits: torch.Tensor
    maps: torch.Tensor | None  # [N, H, W] from the head, None without one
    features: list[torch.Tensor]  # stage outputs, for attention transfer


class StudentNet(nn.Module):
    """A small CNN classifier, optionally carrying an explanation head fused into its input.

    ``concat`` stacks the head's map as an extra input channel; ``gate`` multiplies the
    image by (1 + map). Either way the map takes part in the classification, so the student
    is trained to use the evidence it claims to see.
    """

    default_explain_layer = "stage3"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 16,
        ae_depth: int | None = None,
        ae_width: int = 16,
        fusion: str = "concat",
    ) -> None:
        super().__init__()
        self._architecture = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "ae_depth": ae_depth,
            "ae_width": ae_width,
            "fusion": fusion,
        }
        if fusion not in FUSIONS:
            raise XKDConfigError(f"student.fusion: got {fusion!r}; allowed values are {', '.join(FUSIONS)}")
        self.fusion = fusion
        self.head = ConvAutoencoder(in_channels, ae_depth, ae_width) if ae_depth else None
        classifier_channels = in_channels + 1 if self.head is not None and fusion == "concat" else in_channels
        self.stage1 = conv_block(classifier_channels, width, norm="group")
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), conv_block(width, 2 * width, norm="group"))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), conv_block(2 * width, 4 * width, norm="group"))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def architecture(self) -> dict[str, Any]:
        return dict(self._architecture)

    @classmethod
    def from_architecture(cls, architecture: dict[str, Any]) -> StudentNet:
        try:
            return cls(**architecture)
        except (TypeError, ValueError, RuntimeError) as exc:  # unknown keys, or values torch refuses
            raise XKDCheckpointError(f"student architecture {architecture!r} is not valid: {exc}") from exc

    def forward(self, x: torch.Tensor, return_all: bool = False) -> torch.Tensor | StudentOutput:
        """Logits by default (what captum and users expect); everything the loss needs with
        ``return_all`` (a single forward keeps DDP's gradient hooks in charge)."""
        maps = self.head(x) if self.head is not None else None
        if maps is None:
            fused = x
        elif self.fusion == "concat":
            fused = torch.cat([x, maps], dim=1)
        else:
            fused = x * (1.0 + maps)
        first = self.stage1(fused)
        second = self.stage2(first)
        third = self.stage3(second)
        logits = self.classifier(third)
        if not return_all:
            return logits
        return StudentOutput(logits, None if maps is None else maps[:, 0], [first, second, third])


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits on CPU, in batches, in eval mode, without gradients."""
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat(
            [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
        )


def autocast(device: torch.device | str, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for a training step when ``amp_dtype`` is set (bf16 on GPUs), else nothing:
    one rule for the student's and the teacher's loops."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)
