"""The face-analysis interface every backend implements (:mod:`~lcmla_sdk.faces.dlib_backend`,
:mod:`~lcmla_sdk.faces.insightface_backend`): :class:`FaceAnalyzer` and the :class:`DetectedFace` it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import MultipleFacesError, NoFaceError

ON_MULTIPLE = ("largest", "error")


@dataclass
class DetectedFace:
    """One detection in image pixels: ``box`` (x1, y1, x2, y2), 5 ``landmarks`` in
    :data:`~lcmla_sdk.faces.alignment.ARCFACE_TEMPLATE`'s order, the detector's ``score`` and the L2-normalised
    ``embedding`` of the backend's recogniser (512-d ArcFace for insightface, 128-d ResNet for dlib)."""

    box: np.ndarray
    landmarks: np.ndarray
    score: float
    embedding: np.ndarray

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


class FaceAnalyzer(ABC):
    """Detection + landmarks + recognition. ``name`` is the backend as a ``faces=`` value (recorded in identities
    and evaluation reports); ``det_thresh`` the detector score below which a box is no face."""

    name: str
    det_thresh: float

    @abstractmethod
    def detect(self, image: Image.Image) -> list[DetectedFace]:
        """Every face above the threshold, largest first."""

    def find_face(self, image: Image.Image, on_multiple: str = "largest") -> DetectedFace:
        """The one face to use: the largest, or :class:`MultipleFacesError` when ``on_multiple="error"``."""
        if on_multiple not in ON_MULTIPLE:
            raise ValueError(f"on_multiple: {on_multiple!r} is not one of {ON_MULTIPLE}")
        faces = self.detect(image)
        where = f"the {image.width}x{image.height} image (detector threshold {self.det_thresh}, {self.name})"
        if not faces:
            raise NoFaceError(f"face: no face found in {where}")
        if len(faces) > 1 and on_multiple == "error":
            boxes = ", ".join(str([round(float(v)) for v in face.box]) for face in faces)
            raise MultipleFacesError(f"face: {len(faces)} faces found in {where} at {boxes}; on_multiple='error'")
        return faces[0]
