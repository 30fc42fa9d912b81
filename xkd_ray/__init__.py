"""xkd-ray: explainable knowledge distillation (XDistillation), searched on Ray.

The two functions most users need are re-exported here; neither imports Ray.
"""

from xkd_ray.errors import XKDCheckpointError, XKDConfigError, XKDDataError, XKDError, XKDTrainingDiverged
from xkd_ray.pareto import list_pareto_students, load_pareto_student

__all__ = [
    "XKDCheckpointError",
    "XKDConfigError",
    "XKDDataError",
    "XKDError",
    "XKDTrainingDiverged",
    "list_pareto_students",
    "load_pareto_student",
]
__version__ = "0.1.0"
