"""Errors a user can cause: the CLI prints them as one line and exits non-zero."""


class TestbedError(Exception):
    """A user-facing error (bad input, unreachable peer, unsupported kernel...).

    ``str(err)`` is the one line shown after ``testbed: error:``.
    """

    exit_code = 2
