"""The mistakes a user can fix, by kind. ``distill.py`` prints these as one line naming the problem
and the fix; any other exception is a bug and shows its traceback.

Each kind also derives from the builtin error it used to be (ValueError, RuntimeError, ...), so
code that catches those keeps working. A leaf: imports nothing from ``trainer/``.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user fixes by changing a setting, a file or their environment; the message
    names what is wrong and how to fix it."""

    hint = "[DMSAE_DEBUG=1 shows the traceback]"
    """What ``distill.py`` prints after the message."""

    def one_line(self) -> str:
        """The message as ``distill.py`` prints it."""
        return " ".join(str(self).split("\n"))


class ConfigError(UserError, ValueError):
    """An impossible setting: the message names the field, the value and the fix."""


class CommandLineError(ConfigError):
    """A flag the parser does not know, a flag without its value, or a value of the wrong type."""

    hint = "(--help lists every flag)"  # a typo's traceback would help no one


class ResumeRefusedError(ConfigError):
    """A resume whose changed settings finished work depends on; lists them, one a line."""

    def one_line(self) -> str:
        return str(self)  # the list of differences reads best as it is


class RunExistsError(ConfigError, FileExistsError):
    """The run folder holds another run and --run.resume was not given."""


class CorruptRunFileError(UserError, RuntimeError):
    """A file of the run is missing, truncated or unreadable; the message says what to delete or rerun."""


class EmptyDatasetError(UserError, ValueError):
    """The dataset yields fewer tokens than the run needs."""


class HubPushError(UserError, RuntimeError):
    """A push failed. The run directory is intact; ``--push-only RUN_DIR`` retries what is missing."""
