"""A test plugin: one new entry in each registry, added from outside the package.

Loaded in every test process and Ray worker through ``XKD_PLUGINS`` (see conftest.py);
``tests/test_registries.py`` checks that each entry reaches every output without any other edit.
"""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import InputXGradient

from xkd_ray.config.methods import METHODS, Method
from xkd_ray.config.registries import DATASETS, EXPLAINERS, Dataset, Explainer
from xkd_ray.core.metrics import METRICS, Metric

PLUGIN_METHOD = "ce_head"
PLUGIN_METRIC = "explanation_mass"
PLUGIN_EXPLAINER = "input_x_gradient"
PLUGIN_DATASET = "digits_again"


def _input_x_gradient(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, **_: Any):
    attribution = InputXGradient(model).attribute(images, target=targets).detach().abs().sum(dim=1)
    flat = attribution.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(attribution), 0


METHODS.setdefault(PLUGIN_METHOD, Method("cross-entropy plus the explanation head, no KD (test plugin)", head=True))
METRICS.setdefault(
    PLUGIN_METRIC, Metric(lambda e: float(e.explanation.mean()), "mean value of the explanation (test plugin)")
)
EXPLAINERS.setdefault(PLUGIN_EXPLAINER, Explainer(_input_x_gradient, "captum InputXGradient (test plugin)"))
DATASETS.setdefault(
    PLUGIN_DATASET,
    Dataset(lambda config: DATASETS["digits"].load(config), "the digits under another name (test plugin)", False),
)
