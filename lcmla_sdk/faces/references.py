"""Reference photos as the image encoder and VAE see them: each photo loaded, its face found, cropped and resized."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..images import FaceInput, load_rgb, pixel_sha256, squash
from .alignment import align_face
from .analyzer import DetectedFace, FaceAnalyzer


@dataclass
class References:
    """One entry per photo: the ``pictures`` to encode, the ``sources`` (SHA-256 of each photo's decoded RGB
    pixels) and the ``detections`` (``None`` with detection off)."""

    pictures: list[Image.Image]
    sources: list[str]
    detections: list[DetectedFace | None]


def prepare_references(
    photos: Sequence[FaceInput],
    analyzer: FaceAnalyzer | None,
    size: int,
    *,
    crop: str,
    on_multiple: str,
    face_resize: str,
    lock: threading.RLock,
) -> References:
    """Load each photo and find its face (:meth:`FaceAnalyzer.find_face`, under ``lock``: the detectors keep
    per-call state, so one photo at a time); ``crop="face"`` takes the face aligned in a ``size`` square, and
    ``face_resize="squash"`` resizes the picture to ``size`` without keeping its aspect ratio."""
    references = References([], [], [])
    for photo in photos:
        image = load_rgb(photo)
        references.sources.append(pixel_sha256(image))
        with lock:
            found = analyzer.find_face(image, on_multiple) if analyzer is not None else None
        references.detections.append(found)
        picture = align_face(image, found.landmarks, size) if crop == "face" else image
        references.pictures.append(squash(picture, size) if face_resize == "squash" else picture)
    return references
