"""The identity store: a folder of identity files named by a hash of their content.

An id is derived from what the identity was made from (the model's fingerprint, each photo's decoded pixels, ``crop``
and ``face_resize``), so the same photos give the same id, and from the id alone a file name: a client's id is
checked against :data:`ID` before it comes near a path. Files are written atomically (``Identity.save`` goes through
:mod:`lcmla_sdk.atomic`), so a killed writer leaves the old file or none, never half of one. On a cluster the folder
must be one that every node reads and writes (a network file system).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import IdentityMismatchError, ModelFilesError
from ..identity import Identity
from ..integrity import sha256_json

ID = re.compile(r"^[0-9a-f]{32}$")
SUFFIX = ".safetensors"


class UnknownIdentity(LookupError):
    """No identity with this id in the store (or one made by another model)."""


def identity_id(fingerprint: str, sources: list[str], crop: str, face_resize: str) -> str:
    """The content-hash id of the identity these photos (pixel hashes, in order) give with this model."""
    return sha256_json({"model": fingerprint, "sources": sources, "crop": crop, "face_resize": face_resize})[:32]


def check_id(value: str) -> str:
    if not isinstance(value, str) or not ID.match(value):
        raise ValueError(f"identity: {value!r} is not an identity id (32 lowercase hexadecimal digits)")
    return value


class IdentityStore:
    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, identity: str) -> Path:
        return self.folder / f"{check_id(identity)}{SUFFIX}"

    def exists(self, identity: str) -> bool:
        return self.path(identity).is_file()

    def save(self, identity: Identity, id_: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return identity.save(self.path(id_))

    def load(self, identity: str, fingerprint: str) -> Identity:
        """The stored identity; :class:`UnknownIdentity` when there is none for this model."""
        path = self.path(identity)
        try:
            return Identity.load(path, expected_fingerprint=fingerprint)
        except IdentityMismatchError:
            raise UnknownIdentity(f"identity: {identity} was made by another model") from None
        except ModelFilesError:
            if not path.is_file():
                raise UnknownIdentity(f"identity: no identity {identity}") from None
            raise

    def delete(self, identity: str) -> bool:
        try:
            self.path(identity).unlink()
        except FileNotFoundError:
            return False
        return True

    def ids(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        names = (p.name[: -len(SUFFIX)] for p in self.folder.iterdir() if p.name.endswith(SUFFIX))
        return sorted(name for name in names if ID.match(name))
