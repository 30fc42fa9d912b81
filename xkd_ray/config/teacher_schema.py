"""The ``teacher`` section: which network teaches, how it is trained, and the input it expects.

The input contract (``input_size``, ``mean``, ``std``) says what tensors the teacher was made for;
each ``None`` means "the student's own" (``data.image_size``, the train split's mean/std), so a
config that declares none runs exactly as before. A declared contract is applied by
``xkd_ray.core.teacher_input`` wherever the teacher runs, and the teacher's maps are resized back
to the student's input. Only per-channel counts (1 or 3) can be checked here; that they fit the
dataset's channels is checked when the data is loaded.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from xkd_ray.config.fields import (
    Batch,
    Epochs,
    LearningRate,
    NonEmptyStr,
    NonNegativeFloat,
    Schema,
    Seed,
    Width,
    rule,
)
from xkd_ray.config.registries import TEACHERS, choice

# The normalisation of torchvision's ImageNet weights (and of most models trained the ImageNet way):
# what a user whose teacher saw ``transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)`` declares.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
InputSize = Annotated[int, Field(ge=8, le=2048)]
# One value (every channel) or one per channel; only 1- and 3-channel data exist.
ChannelMeans = Annotated[list[float], Field(min_length=1, max_length=3)]
ChannelStds = Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1, max_length=3)]


class TeacherConfig(Schema):
    """The teacher CNN and how it is trained; its hash keys the saved checkpoint.

    ``input_size``/``mean``/``std``: the input the teacher expects (``null``: the student's size and
    normalisation; ``mean``/``std`` give 1 value or one per channel, in [0, 1] pixel units; an
    ImageNet-trained model declares 0.485,0.456,0.406 / 0.229,0.224,0.225, see docs/TEACHER.md)."""

    arch: NonEmptyStr = "vgg"  # a TEACHERS entry, or ``torchvision.<model>`` (see docs/TEACHER.md)
    width: Width = 32
    epochs: Epochs = 15
    lr: LearningRate = 2e-3
    batch_size: Batch = 64
    weight_decay: NonNegativeFloat = 5e-4
    seed: Seed = 0
    checkpoint: NonEmptyStr | None = None
    weights: NonEmptyStr | None = None  # a state_dict (.pt/.pth/.safetensors): the teacher is never retrained
    # The input contract (docs/TEACHER.md): None = what the student sees.
    input_size: InputSize | None = None
    mean: ChannelMeans | None = None  # per channel, in [0, 1] pixel units (ImageNet: IMAGENET_MEAN)
    std: ChannelStds | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        """torchvision's model list is read only for a ``torchvision.`` name: plain configs import no torch."""
        if value.startswith("torchvision."):
            from torchvision.models import list_models

            if value.removeprefix("torchvision.") not in list_models():
                raise ValueError(
                    f"teacher.arch: got {value!r}; not a torchvision model (torchvision.models.list_models())"
                )
            return value
        return choice(TEACHERS, "teacher.arch", value)

    @model_validator(mode="after")
    def _stats(self) -> TeacherConfig:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) == 2:
                raise rule(f"teacher.{name}", f"got {len(values)} values; give 1 (all channels) or 3 (RGB)")
        return self

    def contract(self) -> dict[str, object]:
        """The declared parts of the input contract (empty when the teacher sees the student's input):
        added to the teacher's cache keys only when declared, so existing caches stay valid."""
        return {k: v for k in ("input_size", "mean", "std") if (v := getattr(self, k)) is not None}
