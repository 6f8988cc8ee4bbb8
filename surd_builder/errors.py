"""Error types a user can cause, and the exit code each maps to.

Library code raises these with a message that says what went wrong and what to do; the CLI
(``surd_builder.cli``) is the one place that turns them into a one-line message and an exit code.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class SurdError(Exception):
    """A failure the user can act on. ``str(error)`` is the one-line message shown to them."""

    exit_code = 1


class InputError(SurdError):
    """Bad user input: a missing folder, a malformed metadata file, an unknown option value."""

    exit_code = 2


class WorkspaceError(SurdError):
    """The workspace is missing, is not a workspace, is busy, or is from an unknown format."""

    exit_code = 3


class ConfigError(SurdError):
    """A configuration file with unknown keys or values of the wrong type."""

    exit_code = 4


class OutputExistsError(SurdError):
    """The output target exists and the user did not ask to overwrite it."""

    exit_code = 5


class OutputError(SurdError):
    """The output could not be written (read-only folder, disk full...)."""

    exit_code = 6


class ServiceError(SurdError):
    """An external service (Label Studio, an LLM server) cannot be reached or refuses surd."""

    exit_code = 7


class Interrupted(SurdError):
    """The user pressed Ctrl-C; what was written stays, and a re-run continues from there."""

    exit_code = 130
