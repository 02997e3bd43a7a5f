"""What went wrong with one request, as the HTTP status and the field a client must change."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidImageError, MultipleFacesError, NoFaceError
from .store import UnknownIdentity

FIELD = re.compile(r"^([a-z_]+)(?: \d+)?:")  # the SDK's messages start with the argument's name


@dataclass(frozen=True)
class Failure:
    status: int
    field: str
    message: str

    def body(self) -> dict[str, str]:
        return {"error": self.message, "field": self.field}


def failure(error: BaseException) -> Failure:
    """The client's mistake that ``error`` reports; anything else is raised again (a server error)."""
    message = str(error)
    if isinstance(error, UnknownIdentity):
        return Failure(404, "identity", message)
    if isinstance(error, (NoFaceError, MultipleFacesError)):
        return Failure(422, "photos", message)
    if isinstance(error, InvalidImageError):
        return Failure(415, "photos", message)
    if isinstance(error, ValueError):
        found = FIELD.match(message)
        return Failure(400, found.group(1) if found else "request", message)
    raise error
