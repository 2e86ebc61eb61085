"""One small exception hierarchy for the whole stack.

Every error the project raises on purpose derives from :class:`CxrError`, so a
caller (a screening pipeline, the CLI) can catch one type and still tell the
cases apart. Each class carries the exit code the ``cxr`` command ends with
(:class:`ExitCode`, the one table; :data:`EXIT_CODES` says it in words).
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    """The exit codes of the ``cxr`` command: one meaning each."""

    #: Done; a check that was asked for said yes.
    OK = 0
    #: An internal error: a bug (``cxr -v`` prints the traceback).
    INTERNAL = 1
    #: A usage error: bad arguments, input, data or configuration, or a missing extra (the line names it).
    USAGE = 2
    #: A check said no: a site audit's no-go, a monitor alarm, a broken audit chain, a model file that does not
    #: match its card, a failed export parity check, a missed target.
    CHECK_FAILED = 3
    #: Try again later: an upstream (the inference server, an archive) is down, overloaded or timed out (EX_TEMPFAIL).
    TEMPFAIL = 75
    #: Interrupted (Ctrl-C: 128 + SIGINT, the shell's convention).
    INTERRUPTED = 130


#: The table of :class:`ExitCode` in words (``cxr --help`` and the docs print it).
EXIT_CODES = """\
exit codes:
  0   ok (a check that was asked for said yes)
  1   internal error: a bug (rerun with -v for the traceback); cxr predict: some input's answer is an error
  2   usage: bad arguments, input, data or configuration, or a missing extra (the line names it)
  3   a check said no: site-audit no-go, adapt not published, monitor alarm, audit chain broken, model
      integrity, export parity, a target or SLO missed (ood-eval, capacity, soak)
  75  try again later: the server or an archive is down, overloaded or timed out
  130 interrupted (Ctrl-C)
"""


class CxrError(Exception):
    """Base class of every error raised by this project.

    Attributes:
        exit_code: What the ``cxr`` command exits with when this error ends it (every subclass states its own).
    """

    exit_code: ClassVar[int] = ExitCode.USAGE


class InvalidInputError(CxrError, ValueError):
    """An input (file, array, tensor) violates the preprocessing contract.

    The message names the input and the reason in one line.
    """

    exit_code: ClassVar[int] = ExitCode.USAGE


class NotAssessableError(CxrError):
    """A readable input that the model cannot judge (not a frontal chest radiograph, blank, colour ...).

    Not an error of the input's encoding: callers report it as the
    ``not_assessable`` status, with this one-line message as the reason.

    Attributes:
        rule: The rule that refused it (a key of :data:`cxr.core.contract.RULES`).
        value: What the rule measured (a number, or the header's text), when it measured one.
        limit: The limit it broke (a number, or the allowed values' text).
        detail: The rule's one-line explanation, without the input's name.
    """

    exit_code: ClassVar[int] = ExitCode.USAGE

    def __init__(self, message: str, *, rule: str, value: float | str | None = None, limit: float | str | None = None,
                 detail: str = "") -> None:
        super().__init__(message)
        self.rule = rule
        self.value = value
        self.limit = limit
        self.detail = detail


class DataError(CxrError):
    """A dataset folder is missing, empty or not in the Kaggle layout."""

    exit_code: ClassVar[int] = ExitCode.USAGE


class CalibrationError(CxrError, ValueError):
    """An operating point cannot be fitted: an unknown rule, a target out of range, a sample too small for the
    requested bound, or a probability scaling that does not converge."""

    exit_code: ClassVar[int] = ExitCode.USAGE


class ExportValidationError(CxrError):
    """An exported model disagrees with its reference.

    Attributes:
        failures: Every failed check, collected before raising.
    """

    exit_code: ClassVar[int] = ExitCode.CHECK_FAILED

    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"export validation failed ({len(self.failures)} checks):\n{lines}")


class ModelIntegrityError(CxrError):
    """A model file's sha256 does not match its model card."""

    exit_code: ClassVar[int] = ExitCode.CHECK_FAILED


class ServerError(CxrError):
    """The inference server could not be started, reached or used."""

    exit_code: ClassVar[int] = ExitCode.USAGE


class RetryableServerError(ServerError):
    """A transient server failure (unavailable, overloaded, timed out)."""

    exit_code: ClassVar[int] = ExitCode.TEMPFAIL
