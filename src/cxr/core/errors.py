"""One small exception hierarchy for the whole stack.

Every error the project raises on purpose derives from :class:`CxrError`, so a
caller (a screening pipeline, the CLI) can catch one type and still tell the
cases apart.
"""

from __future__ import annotations


class CxrError(Exception):
    """Base class of every error raised by this project."""


class InvalidInputError(CxrError, ValueError):
    """An input (file, array, tensor) violates the preprocessing contract.

    The message names the input and the reason in one line.
    """


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

    def __init__(self, message: str, *, rule: str, value: float | str | None = None, limit: float | str | None = None,
                 detail: str = "") -> None:
        super().__init__(message)
        self.rule = rule
        self.value = value
        self.limit = limit
        self.detail = detail


class DataError(CxrError):
    """A dataset folder is missing, empty or not in the Kaggle layout."""


class CalibrationError(CxrError, ValueError):
    """An operating point cannot be fitted: an unknown rule, a target out of range, a sample too small for the
    requested bound, or a probability scaling that does not converge."""


class ExportValidationError(CxrError):
    """An exported model disagrees with its reference.

    Attributes:
        failures: Every failed check, collected before raising.
    """

    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"export validation failed ({len(self.failures)} checks):\n{lines}")


class ModelIntegrityError(CxrError):
    """A model file's sha256 does not match its model card."""


class ServerError(CxrError):
    """The inference server could not be started, reached or used."""


class RetryableServerError(ServerError):
    """A transient server failure (unavailable, overloaded, timed out)."""
