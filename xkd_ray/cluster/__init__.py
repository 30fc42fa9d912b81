"""Ray glue: Ray Train runs, Tune trials, the teacher job, the MO-ASHA scheduler, the Tune
callbacks and Ray Serve. The only package that imports ``ray``.

The glue reaches into a few Ray internals that have no public counterpart in 2.60
(``OptunaSearch._ot_trials``, the Train V2 trainer class, the session of a Tune trial, the list of
variables Tune copies into its trials' runtime env), so the Ray minor version it was tested on is
pinned in pyproject.toml and checked here, at import: another minor fails at once with one line
instead of deep inside a trial.
"""

import ray

from xkd_ray.errors import XKDConfigError

TESTED_RAY = "2.60"
if ".".join(ray.__version__.split(".")[:2]) != TESTED_RAY:
    raise XKDConfigError(f"ray {ray.__version__} is installed; xkd-ray's Ray glue is tested on ray {TESTED_RAY}.x only")
