"""The one family of errors lcmla raises for bad input and bad files.

Every class about bad input or bad files also derives from ``ValueError``, so ``except ValueError`` keeps working;
:class:`WriteError` (the disk, not the input) derives from ``OSError``. ``except LcmlaError`` catches all of them.
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


class IntegrityError(ModelFilesError):
    """A file whose content differs from the sha256 its manifest records; the message names the file and both hashes."""


class WriteError(LcmlaError, OSError):
    """A file or directory that could not be written (disk full, no permission, a directory in the way); the message
    names the path. Writes go to a temporary name first, so what was there before is left as it was."""
