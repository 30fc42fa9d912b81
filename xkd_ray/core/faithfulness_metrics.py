"""The registry's faithfulness entries (``METRICS`` splices them in): deletion / insertion and
ROAD AUCs with their standard errors, the randomisation checks, and the rule that says whether
a perturbation metric can tell a real map from a random one on this data (``informative``).

Every value is a mean over the faithfulness subset (``faithfulness.faithfulness_subset``) of
per-image measurements in ``Evidence.diagnostics``; ``<curve>_se_<whose>`` is the standard error
of ``<curve>_auc_<whose>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from xkd_ray.core.faithfulness import standard_error
from xkd_ray.core.metric_types import CORRELATION, COUNT, UNIT, Evidence, Metric

# A map "beats random" under a curve when its AUC is better than the random maps' by more than
# MARGIN and by more than SE_FACTOR standard errors of the difference (docs/FAITHFULNESS.md).
MARGIN = 0.05
SE_FACTOR = 2.0
NOT_INFORMATIVE = "not informative here"

WHOSE = {
    "teacher": "the teacher with its own maps",
    "teacher_rand": "the teacher with random maps (control of the teacher's)",
    "teacher_shift": "the teacher with its maps shifted elsewhere (the informative check's control)",
    "head": "the student with its head's maps",
    "posthoc": "the student with its post-hoc maps",
    "random": "the student with random maps (control)",
    "shifted": "the student with its post-hoc maps shifted elsewhere (control as smooth as the map)",
}
# curve family -> (direction, what it measures)
CURVES = {
    "deletion": ("min", "deletion AUC (pixels set to the mean, most relevant first; lower = more faithful)"),
    "insertion": ("max", "insertion AUC (pixels revealed on the mean, most relevant first; higher = more faithful)"),
    "road_morf": ("min", "ROAD MoRF AUC (most relevant removed first, noisy linear imputation; lower: more faithful)"),
    "road_lerf": (
        "max",
        "ROAD LeRF AUC (least relevant removed first, noisy linear imputation; higher: more faithful)",
    ),
}


def auc_name(curve: str, whose: str) -> str:
    """The metric name of one curve family for one kind of map: ``road_morf_auc_head``."""
    return f"{curve}_auc_{whose}"


def se_name(curve: str, whose: str) -> str:
    """The name of its standard error: ``road_morf_se_head`` (short enough for an 80-column table)."""
    return f"{curve}_se_{whose}"


def _diagnostic(key: str) -> Callable[[Evidence], float | None]:
    def mean(e: Evidence) -> float | None:
        values = (e.diagnostics or {}).get(key)
        return None if values is None or len(values) == 0 else values.float().mean().item()

    return mean


def _diagnostic_se(key: str) -> Callable[[Evidence], float | None]:
    def error(e: Evidence) -> float | None:
        values = (e.diagnostics or {}).get(key)
        return None if values is None else standard_error(values)

    return error


def informative(teacher_auc: float, control_auc: float, se: float, direction: str, margin: float = MARGIN) -> bool:
    """Can this curve tell the teacher's own maps from a control map (both on the teacher)? The
    teacher's AUC must be better ("min": lower, "max": higher) than the control's by more
    than ``margin`` and by more than ``SE_FACTOR`` x ``se`` (the standard error of the
    difference). When not, a ranking of students by this curve says nothing about their maps."""
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (teacher_auc, control_auc, se)):
        return False
    gap = control_auc - teacher_auc if direction == "min" else teacher_auc - control_auc
    return gap > max(margin, SE_FACTOR * se)


def curve_of(metric: str) -> str | None:
    """The curve family of a registered AUC metric (or its SE), else None."""
    return next((curve for curve in CURVES if metric.startswith((f"{curve}_auc_", f"{curve}_se_"))), None)


def informative_in(metrics: Mapping[str, Any], curve: str, prefix: str = "") -> bool | None:
    """``informative`` read from one split's metrics (``prefix``: "val_" / "test_" for a table
    row): None when the teacher's measurements are missing (nothing to decide from). The control
    is the teacher's own maps shifted elsewhere (as smooth and sparse as its maps); results
    measured before that control existed fall back to random maps."""

    def get(name: str) -> Any:
        return metrics.get(f"{prefix}{name}")

    control_name = "teacher_shift" if get(auc_name(curve, "teacher_shift")) is not None else "teacher_rand"
    teacher, control = get(auc_name(curve, "teacher")), get(auc_name(curve, control_name))
    errors = [get(se_name(curve, whose)) for whose in ("teacher", control_name)]
    if teacher is None or control is None or any(e is None for e in errors):
        return None
    se = math.sqrt(sum(float(e) ** 2 for e in errors))
    return informative(float(teacher), float(control), se, CURVES[curve][0])


def _auc_entries() -> dict[str, Metric]:
    entries: dict[str, Metric] = {}
    for curve, (direction, what) in CURVES.items():
        for whose, who in WHOSE.items():
            name = auc_name(curve, whose)
            entries[name] = Metric(_diagnostic(f"{curve}_{whose}"), f"{what}: {who}", direction, bounds=UNIT)
            entries[se_name(curve, whose)] = Metric(
                _diagnostic_se(f"{curve}_{whose}"),
                f"standard error of {name} over the faithfulness subset",
                "min",
                bounds=COUNT,
                error_of=name,
            )
    return entries


FAITHFULNESS_METRICS: dict[str, Metric] = {
    **_auc_entries(),
    "randomisation_head": Metric(
        _diagnostic("randomisation_head"),
        "Pearson r of the head's map before / after re-initialising the classifier (1: ignores the classifier)",
        "min",
        bounds=CORRELATION,
    ),
    "randomisation_posthoc": Metric(
        _diagnostic("randomisation_posthoc"),
        "Pearson r of the post-hoc map before / after re-initialising the classifier",
        "min",
        bounds=CORRELATION,
    ),
    "mprt_spearman_posthoc": Metric(
        _diagnostic("mprt_spearman_posthoc"),
        "MPRT: Spearman rank correlation of the post-hoc map with the trained student's, mean over the cascading "
        "randomisation steps (top layer first; near 1: the map does not depend on the model)",
        "min",
        bounds=CORRELATION,
    ),
    "mprt_ssim_posthoc": Metric(
        _diagnostic("mprt_ssim_posthoc"),
        "MPRT: SSIM of the post-hoc map with the trained student's, mean over the cascading randomisation steps",
        "min",
        bounds=CORRELATION,
    ),
}
