"""Typed errors: one class per kind of bad input, so the CLI can print one line and exit 2.

Each message names the file or field at fault and what the user can do about it; callers
never need to inspect a traceback to know what went wrong.
"""

from __future__ import annotations


class XKDError(Exception):
    """Base class for every user-facing error raised by xkd-ray."""


class XKDConfigError(XKDError, ValueError):
    """A configuration value or search-space entry is invalid."""


class XKDDataError(XKDError, ValueError):
    """A dataset, data root or image folder cannot be used."""


class XKDCheckpointError(XKDError, ValueError):
    """A teacher or student checkpoint is missing, corrupt or does not match its config."""


class XKDTrainingDiverged(XKDError, RuntimeError):
    """The loss became NaN or infinite (e.g. a learning rate far too large): the run is stopped."""
