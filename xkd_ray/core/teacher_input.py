"""The teacher's input contract: the student's tensors turned into what the teacher was made for.

Every split is stored the student's way (``data.image_size``, standardised with the train split's
mean/std). A teacher declared with its own ``teacher.input_size`` / ``mean`` / ``std`` sees each
batch un-standardised, resized (bilinear, antialiased) and re-standardised with its statistics
(``to_teacher``), and its explanation maps come back resized to the student's input
(``TeacherInput.maps_back``), so the cache, the losses and the metrics stay at the student's size.
With nothing declared the contract is the identity and no tensor is touched (bit-identical).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from xkd_ray.errors import XKDConfigError

if TYPE_CHECKING:
    from xkd_ray.config.teacher_schema import TeacherConfig


def _stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def to_teacher(
    images: torch.Tensor,
    student_mean: Sequence[float],
    student_std: Sequence[float],
    teacher_size: int,
    teacher_mean: Sequence[float],
    teacher_std: Sequence[float],
) -> torch.Tensor:
    """Student-standardised ``[N, C, H, W]`` -> the teacher's ``[N, C', S, S]``.

    ``x * student_std + student_mean`` gives pixels in [0, 1]; grey images meet 3-value teacher
    statistics as 3 repeated channels (what ``Grayscale(3)`` gives a torchvision model); then a
    bilinear antialiased resize to ``teacher_size`` and ``(x - teacher_mean) / teacher_std``."""
    pixels = images * _stats(student_std, images) + _stats(student_mean, images)
    channels = max(len(teacher_mean), len(teacher_std))
    if pixels.shape[1] == 1 and channels > 1:
        pixels = pixels.repeat(1, channels, 1, 1)
    if pixels.shape[-2:] != (teacher_size, teacher_size):
        pixels = F.interpolate(pixels, size=(teacher_size, teacher_size), mode="bilinear", antialias=True)
    return (pixels - _stats(teacher_mean, pixels)) / _stats(teacher_std, pixels)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, H, W]`` maps to ``size`` (bilinear, antialiased when shrinking)."""
    if maps.shape[-2:] == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", antialias=True)[:, 0]


@dataclass(frozen=True)
class TeacherInput:
    """A resolved contract: the student's stats and size, and the teacher's (picklable, for Ray)."""

    student_mean: tuple[float, ...]
    student_std: tuple[float, ...]
    student_size: int
    teacher_size: int
    teacher_mean: tuple[float, ...]
    teacher_std: tuple[float, ...]

    @property
    def identity(self) -> bool:
        return (self.teacher_size, self.teacher_mean, self.teacher_std) == (
            self.student_size,
            self.student_mean,
            self.student_std,
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return images
        return to_teacher(
            images, self.student_mean, self.student_std, self.teacher_size, self.teacher_mean, self.teacher_std
        )

    def maps_back(self, maps: torch.Tensor) -> torch.Tensor:
        """The teacher's maps at the student's input size (min-max range kept: bilinear never overshoots)."""
        return maps if self.identity else resize_maps(maps, (self.student_size, self.student_size))


def resolve(
    teacher: TeacherConfig, student_mean: Sequence[float], student_std: Sequence[float], size: int, channels: int
) -> TeacherInput:
    """``teacher.input_size/mean/std`` with None read as the student's own, checked against the data.

    Statistics give 1 value or one per channel the teacher receives: the data's channels, or 3 for a
    ``torchvision.`` teacher on grey data (it is fed 3 channels either way)."""
    mean, std = tuple(float(v) for v in student_mean), tuple(float(v) for v in student_std)
    allowed = {1, channels} | ({3} if teacher.arch.startswith("torchvision.") and channels == 1 else set())
    for name in ("mean", "std"):
        values = getattr(teacher, name)
        if values is not None and len(values) not in allowed:
            raise XKDConfigError(
                f"teacher.{name}: got {len(values)} values; the data has {channels} channel"
                f"{'s' if channels > 1 else ''}, so give {' or '.join(str(n) for n in sorted(allowed))}"
            )
    declared = [name for name in ("input_size", "mean", "std") if getattr(teacher, name) is not None]
    if declared and not (mean and std):
        raise XKDConfigError(f"teacher.{declared[0]}: the data records no mean/std to convert its tensors from")
    return TeacherInput(
        student_mean=mean,
        student_std=std,
        student_size=size,
        teacher_size=teacher.input_size or size,
        teacher_mean=mean if teacher.mean is None else tuple(float(v) for v in teacher.mean),
        teacher_std=std if teacher.std is None else tuple(float(v) for v in teacher.std),
    )


class StudentView(nn.Module):
    """The teacher as a function of the student's tensors (inference: logits, perturbation curves,
    attention-transfer features). Holds no parameters of its own; ``net`` is the teacher."""

    def __init__(self, net: nn.Module, inputs: TeacherInput) -> None:
        super().__init__()
        self.net, self.inputs = net, inputs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.inputs(images))

    def stages(self, images: torch.Tensor) -> Any:
        return self.net.stages(self.inputs(images))


def student_view(model: nn.Module, inputs: TeacherInput | None) -> nn.Module:
    """``model`` itself when the contract is the identity (bit-identical), else a ``StudentView``."""
    return model if inputs is None or inputs.identity else StudentView(model, inputs)
