"""A student as one file that runs without this package: TorchScript or ONNX.

The artefact holds the model *and* its preprocessing: it takes raw pixels, float32
[N, C, H, W] of any H x W in the training data's raw units (0..255 for 8-bit images, 0..16
for scikit-learn's digits; C = the student's channels), divides by ``pixel_max``, resizes to
the student's input size (bilinear, antialiased: the training rule), standardises with the
training split's mean and std, and returns

* ``logits`` [N, classes] and ``probabilities`` [N, classes] (softmax), and
* ``head_map`` [N, H, W] in [0, 1] at the input's resolution, for students with an
  explanation head (xd, xd_e2kd).

Not exportable: the post-hoc captum maps (Grad-CAM / IG / saliency on the student) that
``Student.predict`` returns for a student without a head; they need autograd through captum,
so a headless student's artefact returns logits and probabilities only. Channel conversion
(grey <-> RGB) and file decoding stay with the caller. The preprocessing record (class names
included) travels inside: TorchScript's extra file ``preprocessing.json``, ONNX's metadata
property ``preprocessing``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xkd_ray.core.checkpoints import atomic_write
from xkd_ray.errors import XKDConfigError
from xkd_ray.student.predict import Student
from xkd_ray.student.preprocessing import FILE, Preprocessing

logger = logging.getLogger(__name__)
FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 18  # Resize with antialias needs opset 18


class _Raw(nn.Module):
    """The student behind its preprocessing, on raw pixels (see the module docstring)."""

    def __init__(self, student: nn.Module, prep: Preprocessing) -> None:
        super().__init__()
        self.student = copy.deepcopy(student).eval()
        for parameter in self.student.parameters():  # an inference artefact: no autograd graph
            parameter.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(1, -1, 1, 1))
        self.pixel_max = float(prep.pixel_max)
        self.size = int(prep.image_size)
        self.has_head = getattr(student, "head", None) is not None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        height, width = pixels.shape[-2], pixels.shape[-1]
        images = pixels / self.pixel_max
        images = F.interpolate(
            images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )
        images = (images - self.mean) / self.std
        output = self.student(images, return_all=True)
        logits = output.logits
        probabilities = torch.softmax(logits, dim=1)
        if not self.has_head:
            return logits, probabilities
        maps = F.interpolate(output.maps[:, None], size=(height, width), mode="bilinear", align_corners=False)
        return logits, probabilities, maps[:, 0]


def output_names(student: Student) -> list[str]:
    names = ["logits", "probabilities"]
    return [*names, "head_map"] if student.model.head is not None else names


def _example(prep: Preprocessing) -> torch.Tensor:
    size = prep.image_size
    return torch.rand(2, prep.channels, size + 3, size + 5, generator=torch.Generator().manual_seed(0)) * prep.pixel_max


def export_torchscript(student: Student, out: str | Path) -> Path:
    """Traced (the model's Python control flow is fixed per student); the input's N, H and W stay
    free because the trace records the resize from the input's own shape."""
    prep = student.prep
    wrapper = _Raw(student.model, prep).eval()
    example = _example(prep)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, yet it is what torch.jit.load reads;
        # the tracer's note concerns GroupNorm's batch-size check, not the computation.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    extra = {FILE: prep.to_json(), "outputs.json": '["' + '", "'.join(output_names(student)) + '"]'}

    def write(temporary: Path) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
            torch.jit.save(traced, str(temporary), _extra_files=extra)

    return atomic_write(out, write)


def export_onnx(student: Student, out: str | Path) -> Path:
    """ONNX (opset 18) with N, H and W dynamic; the preprocessing record in the metadata."""
    import onnx

    prep = student.prep
    wrapper = _Raw(student.model, prep).eval()
    example = _example(prep)
    names = output_names(student)
    batch, height, width = (torch.export.Dim(name, min=1, max=4096) for name in ("batch", "height", "width"))

    def write(temporary: Path) -> None:
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=["pixels"],
            output_names=names,
            dynamic_shapes={"pixels": {0: batch, 2: height, 3: width}},
            verbose=False,
        )
        model = program.model_proto
        entry = model.metadata_props.add()
        entry.key, entry.value = "preprocessing", prep.to_json()
        onnx.save(model, str(temporary))

    return atomic_write(out, write)


def export_student(student: Student, fmt: str, out: str | Path) -> Path:
    if fmt not in FORMATS:
        raise XKDConfigError(f"--format: got {fmt!r}; allowed values are {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise XKDConfigError(f"--out {out}: is a folder; name the file to write")
    path = (export_torchscript if fmt == "torchscript" else export_onnx)(student, out)
    logger.info("exported %s to %s (outputs %s)", student.path, path, output_names(student))
    return path
