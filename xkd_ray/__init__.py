"""xkd-ray: explainable knowledge distillation (XDistillation), searched on Ray."""

from xkd_ray.errors import XKDCheckpointError, XKDConfigError, XKDDataError, XKDError

__all__ = ["XKDCheckpointError", "XKDConfigError", "XKDDataError", "XKDError"]
__version__ = "0.1.0"
