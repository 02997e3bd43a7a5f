"""Face detection, 5-point landmarks, recognition embeddings and alignment: one interface
(:mod:`~lcmla_sdk.faces.analyzer`), two offline backends (:mod:`~lcmla_sdk.faces.dlib_backend`,
:mod:`~lcmla_sdk.faces.insightface_backend`), the choice between them (:mod:`~lcmla_sdk.faces.backend`), alignment
(:mod:`~lcmla_sdk.faces.alignment`) and the reference photos of an identity (:mod:`~lcmla_sdk.faces.references`)."""

from .alignment import ARCFACE_TEMPLATE, align_face
from .analyzer import ON_MULTIPLE, DetectedFace, FaceAnalyzer
from .backend import AUTO, FaceBackend
from .dlib_backend import DlibFaceAnalyzer
from .insightface_backend import InsightFaceAnalyzer, check_face_pack
from .references import References, prepare_references

__all__ = [
    "ARCFACE_TEMPLATE", "AUTO", "DetectedFace", "DlibFaceAnalyzer", "FaceAnalyzer", "FaceBackend",
    "InsightFaceAnalyzer", "ON_MULTIPLE", "References", "align_face", "check_face_pack", "prepare_references",
]  # fmt: skip
