"""Errors a user can act on. The CLI prints their message as one line and exits non-zero.

`UsageError` (exit 2) means the request itself is wrong (a bad budget, an unknown name, a path
that does not exist); `CfspError` (exit 1) means a valid request failed (corrupt weights, a full
disk). Everything else is a bug and keeps its traceback.
"""


class CfspError(Exception):
    """A failure with a message that says what to change."""

    exit_code = 1


class UsageError(CfspError):
    """The request is invalid: bad argument, unknown name, missing input."""

    exit_code = 2
