"""The error raised for data that is missing, corrupt or truncated."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file or directory is missing, corrupt, truncated or in an unrecognised layout.

    The message names the file and says what was expected there. It subclasses ValueError so that
    callers catching bad input in general also catch bad data.
    """
