"""Exceptions raised by dq_kit.

Every error dq_kit raises on bad input derives from :class:`DQError`, names the
problem and says what to do about it. The subclasses also derive from the matching
built-in exception so ``except ValueError`` / ``except FileNotFoundError`` keep working.
"""

from __future__ import annotations


class DQError(Exception):
    """Base class of every dq_kit error."""


class ModelNotFoundError(DQError, FileNotFoundError):
    """A model path or hub id could not be resolved."""


class UnsupportedModelError(DQError, ValueError):
    """The model's architecture cannot be handled (or does not match what was expected)."""


class PlanError(DQError, ValueError):
    """A plan is invalid, corrupt, or does not fit the model it is applied to."""


class VerificationError(DQError):
    """A loaded model does not match its plan: modules quantized that should not be, or the reverse."""


class AnalysisError(DQError, ValueError):
    """The analysis cannot run on this input, or a saved report is missing or corrupt."""


class CalibrationError(DQError, ValueError):
    """Calibration data is empty, malformed, or does not fit the model/processor."""


class DataError(DQError, ValueError):
    """A dataset cannot be used for training as it is: wrong columns, or rows that would fail mid-epoch."""
