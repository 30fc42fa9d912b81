"""Fault injection for tests, outside the user's config schema.

When the environment variable ``XKD_FAULTS`` names a JSON file, each rule in it may fire in a
run whose config matches ``when`` (dotted keys), e.g.::

    [{"fault": "kill_worker", "epoch": 1, "when": {"distill.temperature": 2.0}},
     {"fault": "fail_driver", "when": {"distill.temperature": 3.0}},
     {"fault": "hold", "when": {"distill.temperature": 7.0}, "holding": "/tmp/x/holding"}]

``kill_worker``: the last Ray Train worker SIGKILLs itself at the start of that epoch, once per
run (a real crash, so the real recovery path is exercised); ``fail_driver``: a search trial's
driver raises on every attempt; ``hold``: a search trial's driver touches the rule's ``holding``
file and then waits, before training, for as long as the rule is armed (so a test can interrupt
a search at a known point, a condition to wait on rather than a race). The file is read when a
rule could fire, so a test can write it after Ray has started (workers inherit the variable from
the process that started Ray).
Without the variable, nothing here does anything.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

ENVIRONMENT_VARIABLE = "XKD_FAULTS"
FAULTS = ("kill_worker", "fail_driver", "hold")


def _value(config: dict[str, Any], dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return config.get(section, {}).get(key)


def fault_rule(fault: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """The first rule for ``fault`` whose ``when`` matches the run's config (``to_dict()``), or None."""
    path = os.environ.get(ENVIRONMENT_VARIABLE)
    if not path or not os.path.exists(path):
        return None
    with open(path) as stream:
        rules = json.load(stream)
    for rule in rules:
        if rule.get("fault") not in FAULTS:
            raise ValueError(f"{path}: unknown fault {rule.get('fault')!r}; known: {', '.join(FAULTS)}")
        if rule["fault"] == fault and all(_value(config, k) == v for k, v in rule.get("when", {}).items()):
            return rule
    return None


def hold_while_armed(config: dict[str, Any]) -> None:
    """``hold``: while a rule matching ``config`` is armed, say so (its ``holding`` file) and wait.
    Ends when the rules file no longer holds it, or with the process (a stopped trial)."""
    rule = fault_rule("hold", config)
    if rule is None:
        return
    if rule.get("holding"):
        Path(rule["holding"]).touch()
    while fault_rule("hold", config) is not None:
        time.sleep(0.1)
