"""Typed configuration for every knob, loaded from one YAML file per experiment.

Each section is a dataclass that validates itself in ``__post_init__`` so a bad value fails
at load time, with a message naming the field (``distill.temperature``) and the allowed
values, before any data is read or any process is started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from xkd_ray.errors import XKDConfigError

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
TEACHER_ARCHS = ("vgg", "resnet18")
EXPLAINERS = ("gradcam", "integrated_gradients", "saliency")
METHODS = ("student", "kd", "at", "xd")
EXPLANATION_LOSSES = ("pearson", "mse", "kl", "cosine")
FUSIONS = ("concat", "gate")
MAX_AE_DEPTH = 4


def _fail(field_name: str, problem: str) -> XKDConfigError:
    return XKDConfigError(f"{field_name}: {problem}")


def _choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _fail(field_name, f"got {value!r}; allowed values are {', '.join(allowed)}")


def _positive(field_name: str, value: float, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "a positive integer" if integer else "a positive number"
        raise _fail(field_name, f"got {value!r}; must be {what}")
    if not integer and not math.isfinite(value):
        raise _fail(field_name, f"got {value!r}; must be finite")


def _non_negative_int(field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(field_name, f"got {value!r}; must be an integer >= 0")


def _boolean(field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(field_name, f"got {value!r}; must be true or false")


def _unit_interval(field_name: str, value: Any, *, open_right: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and 0.0 <= value and (value < 1.0 if open_right else value <= 1.0)
    if not ok:
        bound = "[0, 1)" if open_right else "[0, 1]"
        raise _fail(field_name, f"got {value!r}; must lie in {bound}")


@dataclass
class DataConfig:
    """Which images to learn from and how they are split.

    Splits are fixed by ``seed`` so every method and every trial sees the same images.
    """

    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    image_size: int = 32
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    max_train_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, DATASETS)
        _positive("data.image_size", self.image_size, integer=True)
        if self.image_size < 8:
            raise _fail("data.image_size", f"got {self.image_size}; must be >= 8")
        _unit_interval("data.val_fraction", self.val_fraction, open_right=True)
        _unit_interval("data.test_fraction", self.test_fraction, open_right=True)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise _fail("data.val_fraction", "val_fraction + test_fraction must be < 1")
        if self.max_train_samples is not None:
            _positive("data.max_train_samples", self.max_train_samples, integer=True)
        _non_negative_int("data.seed", self.seed)
        _boolean("data.download", self.download)
        if self.dataset != "digits" and not self.root:
            raise _fail(
                "data.root",
                f"dataset {self.dataset!r} is read from a local folder; set data.root "
                "(CLI: --data-root DIR) and add --download to fetch it once",
            )


@dataclass
class TeacherConfig:
    """The teacher CNN and how it is trained; its hash keys the saved checkpoint."""

    arch: str = "vgg"
    width: int = 32
    epochs: int = 15
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 5e-4
    seed: int = 0
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        _choice("teacher.arch", self.arch, TEACHER_ARCHS)
        _positive("teacher.width", self.width, integer=True)
        _positive("teacher.epochs", self.epochs, integer=True)
        _positive("teacher.lr", self.lr)
        _positive("teacher.batch_size", self.batch_size, integer=True)
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise _fail("teacher.weight_decay", f"got {self.weight_decay!r}; must be >= 0")
        _non_negative_int("teacher.seed", self.seed)


@dataclass
class ExplainConfig:
    """How the teacher's explanations are made and where they are cached.

    ``layer`` names the teacher module Grad-CAM explains (``None``: its last conv layer);
    the result depends on it, so it is part of the cache key.
    """

    explainer: str = "gradcam"
    layer: str | None = None
    ig_steps: int = 32
    blur_sigma: float = 1.0
    batch_size: int = 128
    cache_dir: str = ".xkd_cache"

    def __post_init__(self) -> None:
        _choice("explain.explainer", self.explainer, EXPLAINERS)
        _positive("explain.ig_steps", self.ig_steps, integer=True)
        if not (isinstance(self.blur_sigma, (int, float)) and self.blur_sigma >= 0):
            raise _fail("explain.blur_sigma", f"got {self.blur_sigma!r}; must be >= 0")
        _positive("explain.batch_size", self.batch_size, integer=True)


@dataclass
class StudentConfig:
    """The small student classifier and its explanation head (a conv autoencoder)."""

    width: int = 16
    ae_depth: int = 2
    ae_width: int = 16
    fusion: str = "concat"

    def __post_init__(self) -> None:
        _positive("student.width", self.width, integer=True)
        _positive("student.ae_width", self.ae_width, integer=True)
        if isinstance(self.ae_depth, bool) or self.ae_depth not in range(1, MAX_AE_DEPTH + 1):
            raise _fail("student.ae_depth", f"got {self.ae_depth!r}; allowed values are 1, 2, 3, 4")
        _choice("student.fusion", self.fusion, FUSIONS)


@dataclass
class DistillConfig:
    """The method and its loss weights: L = (1-alpha) CE + alpha T^2 KL + beta L_exp."""

    method: str = "xd"
    temperature: float = 4.0
    alpha: float = 0.5
    beta: float = 5.0
    explanation_loss: str = "pearson"
    at_weight: float = 5.0
    head_warmup_epochs: int = 0
    lr: float = 5e-3
    weight_decay: float = 5e-4
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("distill.method", self.method, METHODS)
        _positive("distill.temperature", self.temperature)
        _unit_interval("distill.alpha", self.alpha)
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise _fail("distill.beta", f"got {self.beta!r}; must be a finite number >= 0")
        _choice("distill.explanation_loss", self.explanation_loss, EXPLANATION_LOSSES)
        if not (isinstance(self.at_weight, (int, float)) and self.at_weight >= 0):
            raise _fail("distill.at_weight", f"got {self.at_weight!r}; must be >= 0")
        _non_negative_int("distill.head_warmup_epochs", self.head_warmup_epochs)
        _positive("distill.lr", self.lr)
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise _fail("distill.weight_decay", f"got {self.weight_decay!r}; must be >= 0")
        _positive("distill.epochs", self.epochs, integer=True)
        _positive("distill.batch_size", self.batch_size, integer=True)
        _non_negative_int("distill.seed", self.seed)
        if self.head_warmup_epochs >= self.epochs:
            raise _fail(
                "distill.head_warmup_epochs",
                f"got {self.head_warmup_epochs}; must be smaller than distill.epochs ({self.epochs})",
            )

    @property
    def has_head(self) -> bool:
        """Only XDistillation students carry the explanation head."""
        return self.method == "xd"


@dataclass
class RayConfig:
    """How one student's training is spread over Ray Train workers (0 = plain loop).

    ``threads_per_worker`` caps torch's intra-op threads per worker (0: torch's default), so
    workers sharing a machine do not oversubscribe its cores. ``fail_at_epoch`` and
    ``fail_trial_driver`` are fault hooks for tests: one worker kills itself at that epoch, once;
    a search trial's driver raises before training, on every attempt.
    """

    num_workers: int = 0
    use_gpu: bool = False
    amp: bool = True
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    checkpoints_to_keep: int = 2
    threads_per_worker: int = 0
    fail_at_epoch: int | None = None
    fail_trial_driver: bool = False

    def __post_init__(self) -> None:
        _non_negative_int("ray.num_workers", self.num_workers)
        for name in ("use_gpu", "amp", "fail_trial_driver"):
            _boolean(f"ray.{name}", getattr(self, name))
        _positive("ray.cpus_per_worker", self.cpus_per_worker)
        _non_negative_int("ray.max_failures", self.max_failures)
        _positive("ray.checkpoints_to_keep", self.checkpoints_to_keep, integer=True)
        _non_negative_int("ray.threads_per_worker", self.threads_per_worker)
        if self.fail_at_epoch is not None:
            _non_negative_int("ray.fail_at_epoch", self.fail_at_epoch)


@dataclass
class ExperimentConfig:
    """Everything one run needs; saved next to every model so it can be rebuilt."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        smallest = self.data.image_size // (2**self.student.ae_depth)
        if self.distill.has_head and (self.data.image_size % (2**self.student.ae_depth) != 0 or smallest < 2):
            raise _fail(
                "student.ae_depth",
                f"ae_depth={self.student.ae_depth} is too deep for data.image_size="
                f"{self.data.image_size}: each level halves the image and the bottleneck must "
                "stay >= 2x2 with an image size divisible by 2**ae_depth",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> ExperimentConfig:
        raw = raw or {}
        if not isinstance(raw, dict):
            raise XKDConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
        sections = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise _fail(unknown[0], f"unknown section; allowed sections are {', '.join(sections)}")
        built = {}
        for name, section_cls in _SECTION_CLASSES.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise _fail(name, f"expected a mapping, got {type(values).__name__}")
            allowed = {f.name for f in fields(section_cls)}
            bad = sorted(set(values) - allowed)
            if bad:
                raise _fail(f"{name}.{bad[0]}", f"unknown key; allowed keys are {', '.join(sorted(allowed))}")
            try:
                built[name] = section_cls(**values)
            except TypeError as exc:  # pragma: no cover - guarded by the key check above
                raise _fail(name, str(exc)) from exc
        return cls(**built)

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """Return a copy with dotted keys (``distill.temperature``) replaced, revalidated."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if not key or section not in raw:
                raise _fail(dotted, "override keys look like section.key, e.g. distill.temperature")
            if key not in raw[section]:
                allowed = ", ".join(sorted(raw[section]))
                raise _fail(dotted, f"unknown key; allowed keys in {section} are {allowed}")
            raw[section][key] = value
        return ExperimentConfig.from_dict(raw)


_SECTION_CLASSES: dict[str, type] = {
    "data": DataConfig,
    "teacher": TeacherConfig,
    "explain": ExplainConfig,
    "student": StudentConfig,
    "distill": DistillConfig,
    "ray": RayConfig,
}


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from the CLI, reading the value as YAML so ``4`` is an int."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise XKDConfigError(f"--set {text!r}: expected key=value, e.g. distill.temperature=4")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise XKDConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from exc


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise XKDConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise XKDConfigError(f"{path}: not valid YAML ({exc})") from exc
        try:
            config = ExperimentConfig.from_dict(raw)
        except XKDConfigError as exc:
            raise XKDConfigError(f"{path}: {exc}") from exc
    else:
        config = ExperimentConfig()
    return config.with_overrides(overrides) if overrides else config


def stable_hash(payload: Any, length: int = 16) -> str:
    """Content hash of a JSON-able payload: the key of teacher checkpoints and caches."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
