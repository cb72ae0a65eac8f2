"""Errors raised by dd2-eval on purpose.

Every message names the file or argument, what was expected, what was found and, where cheap, how to fix it.
"""

from __future__ import annotations

from dd2_core.errors import DD2Error


class EvalError(DD2Error):
    """Root of every error that dd2-eval raises on purpose."""


class NpzFormatError(EvalError, ValueError):
    """An .npz file is corrupt, truncated, or does not hold arrays in ADM's layout."""


class MissingResourceError(EvalError, FileNotFoundError):
    """A file the evaluation needs (samples, reference, Inception weights, Fashion-MNIST) is not there."""


class MissingExtraError(EvalError, ImportError):
    """An optional dd2 package (a pip extra of dd2-eval) is not installed; the message names the extra."""
