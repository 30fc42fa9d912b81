"""What a job's Ray workers receive from the driver's environment (``ray.init(runtime_env=...)``).

Ray writes every ``env_vars`` of a runtime environment into its logs (``runtime_env_agent.log``,
mode 0644, readable by every local user), so nothing secret goes there: object-storage
*credentials* reach the workers through the AWS SDK's own chain on each node. On a local Ray
(started by the driver's ``ray.init``) the raylet, and so every worker, inherits the driver's
environment, ``AWS_SECRET_ACCESS_KEY`` included; on a cluster each node uses its own chain
(``~/.aws/credentials`` with mode 0600, or an instance role), set up when the node is.

Ray Tune forwards the driver's ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SECURITY_TOKEN`` / ``AWS_SESSION_TOKEN`` to every trial actor as runtime-env ``env_vars``
(``ray/tune/execution/class_cache.py``, ``ENV_VARS_TO_PROPAGATE``, read by
``_ActorClassCache.get``), which put the secret into that log several times per trial:
``keep_credentials_out_of_tune`` takes them off that list before a search.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Storage settings that say where, never who: safe to forward (runtime_env env_vars are logged by
# Ray). Credentials reach workers through the AWS SDK's own chain on each node (the environment a
# raylet was started with, ~/.aws/credentials, an instance role), never through the job's env_vars.
FORWARDED_AWS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


def keep_credentials_out_of_tune() -> list[str]:
    """Take the AWS credential names off the variables Ray Tune copies from the driver into each
    trial actor's runtime env (Ray 2.60: ``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``),
    so no secret is written to Ray's logs; the trial's workers read credentials from the node's own
    chain instead. Only ``AWS_*`` names that say *who* are taken off (endpoint and region are not
    on Tune's list; ``job_runtime_env`` forwards them). Returns the names removed (none on a second
    call). Called before every search, since Tune reads the list each time it creates a trial."""
    from ray.tune.execution import class_cache

    propagated: set[str] = class_cache.ENV_VARS_TO_PROPAGATE
    credentials = sorted(name for name in propagated if name.startswith("AWS_") and name not in FORWARDED_AWS)
    propagated.difference_update(credentials)
    return credentials


def _plugin_folders(names: str) -> list[str]:
    """The folder each ``XKD_PLUGINS`` module is imported from (the parent of its top-level
    package), for modules loaded from a file rather than installed."""
    import importlib.util

    folders = []
    for name in filter(None, (part.strip() for part in names.split(","))):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.has_location:
            continue
        origin = Path(spec.origin)
        depth = name.count(".") + (1 if origin.name == "__init__.py" else 0)
        folder = str(origin.parents[depth])
        if folder not in folders and "site-packages" not in folder:
            folders.append(folder)
    return folders


def job_runtime_env(environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """What every worker of this job needs from the driver's environment: the object-storage
    endpoint and region (no credential), and ``XKD_PLUGINS`` with the folder of each plugin module
    on ``PYTHONPATH`` (a raylet started by ``ray start`` without them would not know the plugin's
    registry entries)."""
    environ = dict(os.environ if environ is None else environ)
    env_vars = {name: environ[name] for name in FORWARDED_AWS if environ.get(name)}
    plugins = environ.get("XKD_PLUGINS", "").strip()
    if plugins:
        env_vars["XKD_PLUGINS"] = plugins
        folders = _plugin_folders(plugins)
        if folders:
            env_vars["PYTHONPATH"] = os.pathsep.join([*folders, "${PYTHONPATH}"])
    # Inside a Ray job, ray.init refuses an env var the job's own runtime_env also sets (Ray 2.60
    # ``_merge_runtime_env``): the submitter's value already reaches every worker, so it wins.
    job = environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job:
        try:
            submitted = (json.loads(job).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            submitted = {}
        env_vars = {name: value for name, value in env_vars.items() if name not in submitted}
    return {"env_vars": env_vars} if env_vars else None
