"""User-facing errors: problems a person fixes in a config or a call, not bugs.

Everything raised as a :class:`UserError` is printed by the ``nclightning`` command as one
``nclightning: error: ...`` line (exit status 2; ``NCL_DEBUG=1`` shows the traceback). The
message names the problem and the fix (the valid choices, a "did you mean", the files expected).
Library users catch them as the built-in type each also derives from (``ValueError`` for a
setting, ``RuntimeError`` for data).
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "DataError", "UserError"]


class UserError(Exception):
    """Base of every error whose message is meant for the user, not a traceback."""


class ConfigurationError(UserError, ValueError):
    """A setting that cannot work: an unknown layer or option, a bad pair, a width mismatch."""


class DataError(UserError, RuntimeError):
    """A data set cannot be found, fetched, read or subset; the message says how to fix it."""
