"""The one family of errors lcmla raises for bad input and bad files.

Every class also derives from ``ValueError``, so ``except ValueError`` keeps working; ``except LcmlaError`` catches
all of them.
"""

from __future__ import annotations


class LcmlaError(Exception):
    """Base class: the message says what was found and what was expected."""


class InvalidImageError(LcmlaError, ValueError):
    """A face input that is not a usable image (missing file, undecodable bytes, bad array, wrong type)."""


class NoFaceError(LcmlaError, ValueError):
    """The detector found no face above its threshold."""


class MultipleFacesError(LcmlaError, ValueError):
    """Several faces where ``on_multiple="error"`` asked for exactly one."""


class ModelFilesError(LcmlaError, ValueError):
    """Model files that are missing, of the wrong shape or dtype, or unreadable; the message names the path."""


class IdentityMismatchError(LcmlaError, ValueError):
    """An :class:`~lcmla_sdk.Identity` made by another model than the one asked to use it."""
