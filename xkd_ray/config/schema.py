"""Typed configuration for every knob, loaded from one YAML file per experiment.

The schema is declared data (pydantic models), not hand-written checks: a field's type and
bounds are the whole of its validation, so no check can be forgotten for one field and kept
for its neighbour. Every model is strict (no ``True`` for an int, no ``"4"`` for a number; an
int is fine for a float), refuses unknown keys and non-finite numbers, and is frozen, so a
config that passed validation stays valid. Choices are read from the registries (``METHODS``,
``EXPLAINERS``, ...), never listed again here, so adding a method is one registry entry.

A bad value fails at load time, before any data is read or any process started, with one line
naming the field: ``distill.temperature: got 0; must be > 0``.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from xkd_ray.config.faithfulness_schema import FaithfulnessConfig
from xkd_ray.config.fields import (
    Batch,
    Choice,
    Epochs,
    Fraction,
    LearningRate,
    NonEmptyStr,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Schema,
    Seed,
    Width,
    rule,
)
from xkd_ray.config.methods import GRADIENT_MAP_EXPLAINERS, METHODS
from xkd_ray.config.registries import DATASETS, EXPLAINERS, EXPLANATION_LOSSES, FUSIONS, MAX_AE_DEPTH
from xkd_ray.config.teacher_schema import TeacherConfig
from xkd_ray.config.yaml_loader import read_yaml
from xkd_ray.errors import XKDConfigError


class DataConfig(Schema):
    """Which images to learn from and how they are split.

    Splits are fixed by ``seed`` so every method and every trial sees the same images.
    """

    dataset: Choice(DATASETS, "data.dataset") = "digits"
    root: str | None = None
    download: bool = False
    image_size: Annotated[int, Field(ge=8, le=2048)] = 32
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.15  # searches select on validation: never empty
    test_fraction: Fraction = 0.2
    max_train_samples: PositiveInt | None = None
    seed: Seed = 0
    # Larger than memory (docs/DATA.md): ``auto`` streams image folders whose float32 tensors would
    # exceed ``stream_threshold_mb``; ``augment`` None = on for image folders and CIFAR, off otherwise.
    storage: Literal["auto", "memory", "stream"] = "auto"
    stream_threshold_mb: PositiveInt = 2048
    augment: bool | None = None
    # Byte-identical image files (imagefolder): refuse the tree, or keep one copy of each (docs/DATA.md).
    duplicates: Literal["refuse", "drop"] = "refuse"

    @model_validator(mode="after")
    def _rules(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise rule("data.val_fraction", "val_fraction + test_fraction must be < 1")
        if DATASETS[self.dataset].needs_root and not self.root:
            raise rule(
                "data.root",
                f"dataset {self.dataset!r} is read from a local folder; set data.root "
                "(CLI: --data-root DIR) and add --download to fetch it once",
            )
        if self.root and not DATASETS[self.dataset].needs_root:
            reading = [name for name, entry in DATASETS.items() if entry.needs_root]
            raise rule(
                "data.root",
                f"dataset {self.dataset!r} reads no folder, so {self.root!r} would be ignored; "
                f"name the dataset it holds (--dataset {' | '.join(reading)})",
            )
        if self.storage == "stream" and self.dataset != "imagefolder":
            raise rule("data.storage", f"stream reads image folders only; {self.dataset!r} loads in memory")
        if self.duplicates == "drop" and self.dataset != "imagefolder":
            raise rule("data.duplicates", f"drop applies to image folders only; {self.dataset!r} has no files to drop")
        return self

    @property
    def augment_on(self) -> bool:
        """``augment`` resolved: on by default where crops and flips are standard (real photos)."""
        if self.augment is not None:
            return self.augment
        return self.dataset in ("imagefolder", "cifar10", "cifar100")


class ExplainConfig(Schema):
    """How the teacher's explanations are made and where they are cached.

    ``layer`` names the teacher module Grad-CAM explains (``None``: its last conv layer);
    the result depends on it, so it is part of the cache key.
    """

    explainer: Choice(EXPLAINERS, "explain.explainer") = "gradcam"
    layer: NonEmptyStr | None = None
    ig_steps: PositiveInt = 32
    blur_sigma: NonNegativeFloat = 1.0
    batch_size: Batch = 128
    cache_dir: NonEmptyStr = ".xkd_cache"

    @field_validator("cache_dir")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        if "\0" in value:
            raise ValueError("explain.cache_dir: contains a NUL byte")
        if ".." in value.replace("\\", "/").split("/"):
            raise ValueError(f"explain.cache_dir: {value!r} has a '..' part; name the folder directly")
        return value


class StudentConfig(Schema):
    """The small student classifier and its explanation head (a conv autoencoder)."""

    width: Width = 16
    ae_depth: Annotated[int, Field(ge=1, le=MAX_AE_DEPTH)] = 2
    ae_width: Width = 16
    fusion: Choice(FUSIONS, "student.fusion") = "concat"


class DistillConfig(Schema):
    """The method and its loss weights: L = (1-alpha) CE + alpha T^2 KL + beta L_exp + ...

    Every weight is a field even when the chosen method ignores it (``METHODS[m].loss_weights``
    zeroes it), so a search can switch methods without changing its keys."""

    method: Choice(METHODS, "distill.method") = "xd"
    temperature: Annotated[float, Field(ge=1e-2, le=1e3)] = 4.0  # 1e-300 would overflow logits / T
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    beta: NonNegativeFloat = 5.0
    explanation_loss: Choice(EXPLANATION_LOSSES, "distill.explanation_loss") = "pearson"
    at_weight: NonNegativeFloat = 5.0
    # e2kd, xd_e2kd: the weight and distance of the term that pulls the student's own Grad-CAM to E_T.
    # e2KD's authors use cosine with weight 1; on digits (validation split, seed 0) Pearson with weight 2
    # moved the student's own map most at no accuracy cost (README, "Whose explanation is it?").
    e2kd_weight: NonNegativeFloat = 2.0
    e2kd_loss: Choice(EXPLANATION_LOSSES, "distill.e2kd_loss") = "pearson"
    # xd_e2kd: the weight of a term pulling the student's own map to its head's map (stop-gradient
    # on the head), so the map the head shows is the student's reason (head_honesty). 0: off.
    honesty_weight: NonNegativeFloat = 0.0
    # e2kd_grad with an IG teacher: Riemann steps of the student's own trainable IG map. 1 is
    # input x gradient (one backward); k steps cost k forward and double-backward passes.
    student_ig_steps: Annotated[int, Field(ge=1, le=64)] = 1
    head_warmup_epochs: Annotated[int, Field(ge=0)] = 0
    lr: LearningRate = 5e-3
    weight_decay: NonNegativeFloat = 5e-4
    epochs: Epochs = 20
    batch_size: Batch = 64
    seed: Seed = 0

    @model_validator(mode="after")
    def _rules(self) -> DistillConfig:
        if self.head_warmup_epochs >= self.epochs:
            raise rule(
                "distill.head_warmup_epochs",
                f"got {self.head_warmup_epochs}; must be smaller than distill.epochs ({self.epochs})",
            )
        return self


class RayConfig(Schema):
    """How one student's training is spread over Ray Train workers (0 = plain loop).

    ``threads_per_worker`` caps torch's intra-op threads per worker (0: torch's default), so
    workers sharing a machine do not oversubscribe its cores.
    """

    num_workers: Annotated[int, Field(ge=0)] = 0
    use_gpu: bool = False
    amp: bool = True
    cpus_per_worker: PositiveFloat = 1.0
    max_failures: Annotated[int, Field(ge=0)] = 2
    checkpoints_to_keep: PositiveInt = 2
    threads_per_worker: Annotated[int, Field(ge=0)] = 0


class ExperimentConfig(Schema):
    """Everything one run needs; saved next to every model so it can be rebuilt.

    The rules between sections live here, so they hold for every way a config is built
    (file, ``--set``, a search trial) and a trial can never fail on them inside a Ray worker.
    """

    noun: ClassVar[str] = "section"
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    explain: ExplainConfig = ExplainConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    ray: RayConfig = RayConfig()
    faithfulness: FaithfulnessConfig = FaithfulnessConfig()

    @model_validator(mode="after")
    def _rules(self) -> ExperimentConfig:
        depth, size = self.student.ae_depth, self.data.image_size
        if METHODS[self.distill.method].head and (size % 2**depth != 0 or size // 2**depth < 2):
            raise rule(
                "student.ae_depth",
                f"ae_depth={depth} is too deep for data.image_size={size}: each level halves the image and "
                "the bottleneck must stay >= 2x2 with an image size divisible by 2**ae_depth",
            )
        if (
            METHODS[self.distill.method].student_map == "gradient"
            and self.explain.explainer not in GRADIENT_MAP_EXPLAINERS
        ):
            raise rule(
                "distill.method",
                f"{self.distill.method} matches the student's gradient map to the teacher's; explain.explainer must be "
                f"one of {', '.join(GRADIENT_MAP_EXPLAINERS)} (got {self.explain.explainer})",
            )
        workers, batch = self.ray.num_workers, self.distill.batch_size
        if workers > 0 and batch % workers != 0:
            raise rule(
                "distill.batch_size",
                f"got {batch}; must be divisible by ray.num_workers ({workers}): "
                "the global batch is split evenly over workers",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of builtins (JSON-able); ``from_dict`` reads it back equal."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> ExperimentConfig:
        raw = raw or {}
        if not isinstance(raw, dict):
            raise XKDConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise config_error(exc, cls) from None

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """Return a copy with dotted keys (``distill.temperature``) replaced, revalidated."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = str(dotted).partition(".")
            if not key or section not in raw:
                raise XKDConfigError(f"{dotted}: override keys look like section.key, e.g. distill.temperature")
            if key not in raw[section]:
                allowed = ", ".join(sorted(raw[section]))
                raise XKDConfigError(f"{dotted}: unknown key; allowed keys in {section} are {allowed}")
            raw[section][key] = value
        return ExperimentConfig.from_dict(raw)


# ----------------------------------------------------------------------------- errors

_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_TYPES = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string"}
_TYPES |= {"tuple_type": "a list", "list_type": "a list", "dict_type": "a mapping"}


def _problem(error: dict[str, Any], holder: type[Schema]) -> str:
    """Pydantic's error in the words of this project: what was given, and what is allowed."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    got = f"got {reprlib.repr(value)}"
    if kind == "extra_forbidden":
        names = list(holder.model_fields) if holder.noun == "section" else sorted(holder.model_fields)
        return f"unknown {holder.noun}; allowed {holder.noun}s are {', '.join(names)}"
    if kind == "model_type":
        return f"expected a mapping, got {type(value).__name__}"
    if kind == "literal_error":  # ctx: "'student', 'kd', 'at' or 'xd'"
        return f"{got}; allowed values are {ctx['expected'].replace(' or ', ', ').replace(chr(39), '')}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"{got}; must be {_BOUNDS[kind]} {int(bound) if float(bound).is_integer() else bound}"
    if kind in _TYPES:
        return f"{got}; must be {_TYPES[kind]}"
    if kind in ("finite_number", "string_too_short"):
        return f"{got}; must be {'finite' if kind == 'finite_number' else 'non-empty'}"
    return f"{got}; {error['msg'][:1].lower()}{error['msg'][1:]}"


def config_error(exc: ValidationError, model: type[Schema]) -> XKDConfigError:
    """The first problem of ``exc`` as one line ``section.field: problem`` (unknown keys first:
    a misspelt key often explains the other errors)."""
    error = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")[0]
    if error["type"] == "value_error":  # a rule between fields: its message names its own field
        return XKDConfigError(" ".join(str(error["ctx"]["error"]).split()))
    loc, path, holder = tuple(error["loc"]), model.where, model
    for index, part in enumerate(loc):
        path = f"{path}[{part}]" if isinstance(part, int) else (f"{path}.{part}" if path else str(part))
        field = holder.model_fields.get(part) if isinstance(part, str) and index < len(loc) - 1 else None
        if field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, Schema):
            holder = field.annotation  # the section an unknown key was found in
    return XKDConfigError(" ".join(f"{path or 'config'}: {_problem(error, holder)}".split()))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults) and apply dotted overrides."""
    config = ExperimentConfig()
    if path is not None:
        path = Path(path)
        raw = read_yaml(path, "config file")
        try:
            config = ExperimentConfig.from_dict(raw)
        except XKDConfigError as exc:
            raise XKDConfigError(f"{path}: {exc}") from None
    return config.with_overrides(overrides) if overrides else config
