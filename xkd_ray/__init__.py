"""xkd-ray: explainable knowledge distillation (XDistillation), searched on Ray.

The two functions most users need are re-exported here; neither imports Ray.
"""


def _load_plugins() -> None:
    """Import the modules named in ``XKD_PLUGINS`` (comma-separated), so the registry entries
    they add (methods, metrics, explainers, datasets) exist in every process that imports
    xkd_ray, Ray workers included: a new entry never needs an edit inside the package."""
    import importlib
    import os

    for name in filter(None, (part.strip() for part in os.environ.get("XKD_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"XKD_PLUGINS: cannot import {name!r} ({exc})") from exc


# First, so that every module imported below (the config's choices among them) sees the entries.
_load_plugins()

from xkd_ray.errors import XKDCheckpointError, XKDConfigError, XKDDataError, XKDError, XKDTrainingDiverged  # noqa: E402

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


def __getattr__(name: str):  # PEP 562: the readers (and torch) load on first use, not on `import xkd_ray`
    if name in ("list_pareto_students", "load_pareto_student"):
        from xkd_ray.pareto import front

        return getattr(front, name)
    raise AttributeError(f"module 'xkd_ray' has no attribute {name!r}")
