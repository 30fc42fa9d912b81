"""A saved student as a usable classifier: raw images in, labels, probabilities and maps out.

``Student.predict`` applies the folder's saved preprocessing (``preprocessing.json``) to raw
inputs, runs the model exactly as the internal evaluation does (eval mode, batches, float32),
and returns the student's own explanation at each input's resolution: its head's map, or,
for a student without a head, the captum explainer of its experiment run on the student for
its own predicted class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xkd_ray.core.checkpoints import load_student
from xkd_ray.core.explain import explain_maps
from xkd_ray.core.models import StudentNet
from xkd_ray.student.preprocessing import Preprocessing, raw_to_batch, read_preprocessing, require, to_input_size

BATCH_SIZE = 256  # the internal evaluation's batch size (``distill.student_predictions``)


@dataclass(frozen=True)
class Prediction:
    """One entry per input image, in input order (a batch array counts as its images)."""

    labels: torch.Tensor  # int64 [N]
    class_names: list[str]  # the predicted class's name per image
    probabilities: torch.Tensor  # float32 [N, classes], softmax of the logits
    logits: torch.Tensor  # float32 [N, classes]
    maps: list[torch.Tensor] | None  # per image [H, W] in [0, 1] at the input's resolution (None: not asked)
    map_kind: str  # "head" or the post-hoc explainer's name

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self) -> list[dict[str, Any]]:
        """JSON-able records: label, class name, its probability and every class's."""
        return [
            {
                "label": int(label),
                "class_name": name,
                "probability": float(self.probabilities[index, label]),
                "probabilities": [float(p) for p in self.probabilities[index]],
            }
            for index, (label, name) in enumerate(zip(self.labels.tolist(), self.class_names, strict=True))
        ]


@dataclass
class Student:
    """A student folder loaded: ``model`` (an ``nn.Module`` on standardised tensors), its
    ``metrics`` and ``config`` (config.json), its ``path``, and its ``preprocessing`` (None for a
    folder saved before students carried one: ``predict`` then refuses, saying how to re-save)."""

    model: StudentNet
    metrics: dict[str, Any]
    config: dict[str, Any]
    path: Path
    preprocessing: Preprocessing | None = None

    @property
    def prep(self) -> Preprocessing:
        return require(self.preprocessing, self.path)

    @property
    def map_kind(self) -> str:
        return self.prep.explanation.kind

    def forward_batch(self, batch: torch.Tensor, explain: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standardised [N, C, S, S] -> (logits, maps [N, S, S] or None), in batches as the
        internal evaluation runs them, so the numbers are the same bit for bit."""
        self.model.eval()
        device = next(self.model.parameters()).device
        logits, maps = [], []
        with torch.no_grad():
            for start in range(0, len(batch), BATCH_SIZE):
                output = self.model(batch[start : start + BATCH_SIZE].to(device), return_all=True)
                logits.append(output.logits.float().cpu())
                if output.maps is not None:
                    maps.append(output.maps.float().cpu())
        all_logits = torch.cat(logits)
        if not explain:
            return all_logits, None
        if maps:
            return all_logits, torch.cat(maps)
        settings = self.prep.explanation
        posthoc = explain_maps(
            self.model,
            batch,
            all_logits.argmax(dim=1),
            explainer=settings.explainer,
            layer=None,
            ig_steps=settings.ig_steps,
            blur_sigma=settings.blur_sigma,
            batch_size=BATCH_SIZE,
        ).maps
        return all_logits, posthoc

    def predict(
        self, inputs: Any, *, explain: bool = True, pixel_max: float | None = None, preprocessed: bool = False
    ) -> Prediction:
        """Classify raw images (see ``preprocessing.raw_to_batch`` for what ``inputs`` may be).

        ``pixel_max``: the raw value of full intensity in arrays when it is not the training
        data's (e.g. 1.0 for floats in [0, 1]). ``preprocessed=True``: ``inputs`` is already a
        standardised [N, C, S, S] tensor (a split's ``images``)."""
        prep = self.prep
        if preprocessed:
            batch = torch.as_tensor(inputs, dtype=torch.float32)
            sizes = [tuple(batch.shape[-2:])] * len(batch)
        else:
            batch, sizes = raw_to_batch(inputs, prep, pixel_max)
        logits, maps = self.forward_batch(batch, explain)
        probabilities = torch.softmax(logits, dim=1)
        labels = logits.argmax(dim=1)
        return Prediction(
            labels=labels,
            class_names=[prep.class_names[i] for i in labels.tolist()],
            probabilities=probabilities,
            logits=logits,
            maps=None if maps is None else to_input_size(maps, sizes),  # type: ignore[arg-type]
            map_kind=prep.explanation.kind,
        )

    def explain(self, inputs: Any, *, pixel_max: float | None = None, preprocessed: bool = False) -> torch.Tensor:
        """The student's own maps for its own predictions, at the inputs' resolution: a tensor
        [N, H, W] when every input has the same size (a list of [H, W] maps otherwise)."""
        maps = self.predict(inputs, pixel_max=pixel_max, preprocessed=preprocessed).maps or []
        return torch.stack(maps) if len({tuple(m.shape) for m in maps}) == 1 else maps  # type: ignore[return-value]


def load_student_folder(folder: str | Path, *, require_preprocessing: bool = True) -> Student:
    """A student folder (``xkd distill --out``, a search's ``students/`` or ``pareto/`` member).
    Without ``preprocessing.json`` it is refused unless ``require_preprocessing=False``."""
    folder = Path(folder)
    model, config, metrics = load_student(folder)
    preprocessing = read_preprocessing(folder)
    if require_preprocessing:
        require(preprocessing, folder)
    return Student(model=model, metrics=metrics, config=config, path=folder, preprocessing=preprocessing)
