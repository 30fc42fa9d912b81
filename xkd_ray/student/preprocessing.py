"""What a student expects of its input, saved as ``preprocessing.json`` in every student folder.

A student is trained on tensors that were scaled, resized and standardised with the *training
split's* statistics; without those numbers it cannot be applied to a new image. ``Preprocessing``
records them (and the class names and explanation settings), and ``raw_to_batch`` applies them to
raw inputs: uint8 / float arrays or tensors of any size, PIL images and image files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xkd_ray.errors import XKDCheckpointError, XKDDataError

FILE = "preprocessing.json"
FORMAT_VERSION = 1
RESIZE_RULES = ("torch_bilinear_antialias", "pil_bilinear")
# ITU-R 601 luma, the weights PIL's convert("L") uses: an RGB input to a grey student.
GREY_WEIGHTS = (0.299, 0.587, 0.114)
RESAVE_HINT = "re-save it with `xkd upgrade FOLDER` (recomputes it from the data its config.json names)"


@dataclass(frozen=True)
class Explanation:
    """Which map the student shows for a prediction: its head's (``kind="head"``), or a captum
    explainer run on the student itself for its own predicted class (students without a head)."""

    kind: str  # "head" or the explainer's name (gradcam, integrated_gradients, saliency)
    explainer: str = "gradcam"
    ig_steps: int = 32
    blur_sigma: float = 1.0


@dataclass(frozen=True)
class Preprocessing:
    """Raw image -> the tensor the student was trained on.

    Arrays are read in the training data's raw units: ``value / pixel_max`` gives [0, 1]
    (16 for scikit-learn's digits, 255 for 8-bit images); PIL images and files are 8-bit, so
    always divided by 255. Then the image is brought to ``channels`` (RGB -> grey with the luma
    weights, grey -> RGB by repetition), resized to ``image_size`` squared by ``resize`` and
    standardised with ``mean`` / ``std`` (per channel, from the training split).
    """

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_max: float
    resize: str
    class_names: tuple[str, ...]
    explanation: Explanation
    dataset: str = ""
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        problems = []
        if self.channels not in (1, 3):
            problems.append(f"channels={self.channels} (must be 1 or 3)")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            problems.append(f"mean/std need {self.channels} values each")
        if any(value <= 0 for value in self.std) or self.pixel_max <= 0 or self.image_size < 1:
            problems.append("std, pixel_max and image_size must be positive")
        if self.resize not in RESIZE_RULES:
            problems.append(f"resize={self.resize!r} (one of {', '.join(RESIZE_RULES)})")
        if len(self.class_names) < 2:
            problems.append("fewer than 2 class names")
        if problems:
            raise XKDCheckpointError(f"preprocessing is not valid: {'; '.join(problems)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessing:
        try:
            fields = dict(raw)
            fields["explanation"] = Explanation(**fields["explanation"])
            for name in ("mean", "std", "class_names"):
                fields[name] = tuple(fields[name])
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise XKDCheckpointError(f"preprocessing is not valid ({exc})") from None

    def standardise(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, S, S] in [0, 1] -> the training split's units (the same float32 ops as training)."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return images.sub(mean).div(std)


def preprocessing_of(splits: Any, explain: Any, has_head: bool) -> Preprocessing:
    """The record for a student trained on ``splits`` (``data.splits.Splits``) with the
    experiment's ``explain`` settings."""
    return Preprocessing(
        image_size=int(splits.image_size),
        channels=int(splits.in_channels),
        mean=tuple(splits.mean),
        std=tuple(splits.std),
        pixel_max=float(splits.pixel_max),
        resize=splits.resize_rule,
        class_names=tuple(splits.class_names),
        explanation=Explanation(
            kind="head" if has_head else explain.explainer,
            explainer=explain.explainer,
            ig_steps=explain.ig_steps,
            blur_sigma=explain.blur_sigma,
        ),
        dataset=str(splits.name),
    )


def read_preprocessing(folder: str | Path) -> Preprocessing | None:
    """The folder's record, or None for a folder saved before students carried one."""
    path = Path(folder) / FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise XKDCheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise XKDCheckpointError(f"{path}: expected a JSON object")
    try:
        return Preprocessing.from_dict(raw)
    except XKDCheckpointError as exc:
        raise XKDCheckpointError(f"{path}: {exc}") from None


def require(preprocessing: Preprocessing | None, folder: str | Path) -> Preprocessing:
    """Refuse a student folder without ``preprocessing.json``: one line saying how to re-save it."""
    if preprocessing is None:
        raise XKDCheckpointError(f"{folder}: student has no {FILE} (saved by an older version); {RESAVE_HINT}")
    return preprocessing


# ----------------------------------------------------------------------------- raw inputs


def _is_image(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pillow is optional for arrays and tensors
        return False
    return isinstance(item, Image.Image)


def _open(path: str | Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise XKDDataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise XKDDataError(f"{path}: cannot read image ({str(exc).splitlines()[0][:200]})") from None


def _from_image(image: Any, prep: Preprocessing) -> torch.Tensor:
    """PIL image -> [1, C, S, S] in [0, 1]. Image-folder students resize with PIL on the 8-bit
    image, exactly as their training files were read; others resize the float tensor."""
    from PIL import Image

    image = image.convert("L" if prep.channels == 1 else "RGB")
    if prep.resize == "pil_bilinear" and image.size != (prep.image_size, prep.image_size):
        image = image.resize((prep.image_size, prep.image_size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image).copy()).float().div_(255.0)
    pixels = pixels[None, None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)[None]
    return pixels


def _as_nchw(array: torch.Tensor, channels: int) -> torch.Tensor:
    """Arrays of any layout -> [N, C, H, W]: 2-D is one grey image; 3-D is H x W x C when the last
    axis has 1, 3 or 4 entries, C x H x W when the first axis has the student's channel count
    (so [3, H, W] is one RGB image for an RGB student, three grey images for a grey one), else N
    grey images; 4-D is N x C x H x W when axis 1 has 1, 3 or 4 entries, else N x H x W x C."""
    shape = tuple(array.shape)
    if array.ndim == 2:
        return array[None, None]
    if array.ndim == 3:
        if shape[-1] in (1, 3, 4):
            return array.permute(2, 0, 1)[None]
        if shape[0] == channels:
            return array[None]
        return array[:, None]
    if array.ndim == 4:
        if shape[1] in (1, 3, 4):
            return array
        if shape[-1] in (1, 3, 4):
            return array.permute(0, 3, 1, 2)
    raise XKDDataError(f"input of shape {list(shape)} is not an image or a batch of images (HxW, HxWxC, NxCxHxW)")


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == 4:  # RGBA: the alpha channel carries no class evidence
        images = images[:, :3]
    if images.shape[1] == channels:
        return images
    if channels == 1:
        weights = torch.tensor(GREY_WEIGHTS, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    return images.expand(-1, 3, -1, -1).contiguous()


def _from_array(item: Any, prep: Preprocessing, pixel_max: float | None) -> torch.Tensor:
    if isinstance(item, np.ndarray):
        if item.dtype.kind not in "uif":
            raise XKDDataError(f"input dtype {item.dtype} is not a number type an image can have")
        item = torch.from_numpy(np.array(item, copy=True))  # a read-only view (np.asarray of a PIL image)
    tensor = item
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise XKDDataError(f"input dtype {tensor.dtype} is not a number type an image can have")
    images = _as_nchw(tensor.detach().cpu(), prep.channels).float()
    if images.numel() == 0:
        raise XKDDataError(f"input of shape {list(tensor.shape)} holds no pixels")
    if not torch.isfinite(images).all():
        raise XKDDataError("input holds NaN or infinite values")
    return images / float(pixel_max or prep.pixel_max)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """The training rule (``data.splits.resize``): bilinear with antialiasing."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def raw_to_batch(
    inputs: Any, prep: Preprocessing, pixel_max: float | None = None
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Raw inputs -> (standardised float32 [N, C, S, S], each image's original (H, W)).

    ``inputs``: an array / tensor (one image or a batch), a PIL image, a file path, or a list of
    these. ``pixel_max`` overrides the raw value of full intensity for arrays (e.g. 1.0 for floats
    already in [0, 1])."""
    items: Sequence[Any] = inputs if isinstance(inputs, list | tuple) else [inputs]
    if not items:
        raise XKDDataError("no input images given")
    batches: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, str | Path):
            item = _open(item)
        if _is_image(item):
            sizes.append((item.size[1], item.size[0]))
            images = _from_image(item, prep)
        elif isinstance(item, torch.Tensor | np.ndarray):
            images = _from_array(item, prep, pixel_max)
            sizes.extend([tuple(images.shape[-2:])] * len(images))  # type: ignore[list-item]
        else:
            raise XKDDataError(f"cannot read an image from a {type(item).__name__}; give an array, PIL image or path")
        batches.append(prep.standardise(_resize(_to_channels(images, prep.channels), prep.image_size)))
    return torch.cat(batches), sizes


def to_input_size(maps: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """[N, S, S] maps -> one map per image at that image's own resolution (bilinear)."""
    out = []
    for index, size in enumerate(sizes):
        one = maps[index]
        if tuple(one.shape) != size:
            one = F.interpolate(one[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        out.append(one)
    return out
