"""The dlib face backend: detector, shape predictor and 128-d face-recognition ResNet, all offline.

Model files (dlib's own, as shipped by the ``face_recognition_models`` package; licences in docs/FACES.md):
``mmod_human_face_detector.dat`` (CNN detector; the HOG detector is built into dlib),
``shape_predictor_5_face_landmarks.dat``, ``shape_predictor_68_face_landmarks.dat`` and
``dlib_face_recognition_resnet_model_v1.dat``. They are dlib's serialisation format, read by dlib (no pickle).

Landmarks on the 5-point template (:data:`~lcmla_sdk.faces.alignment.ARCFACE_TEMPLATE`: eye centres, nose tip, mouth
corners):

* 68-point predictor (``landmarks=68``): all five are measured: each eye centre is the mean of that eye's six
  points (36-41 image-left, 42-47 image-right), the nose tip is point 30, the mouth corners are points 48 and 54.
* 5-point predictor (``landmarks=5``, the default): it measures each eye's two corners and the base of the nose
  (points 0-1: image-right eye, 2-3: image-left eye, 4: below the nose tip), and no mouth at all. The eye centres
  are the midpoints of the corners (measured); the similarity transform that puts the template's eye centres on them
  then places the template's nose tip and mouth corners. The nose base is not used: it is not the template's nose
  tip, and one point more cannot say where the mouth is. Alignment from these points is alignment by the eyes (what
  ``align_face`` computes from them is exactly the eyes' similarity transform). On the sample face and the
  astronaut, the placed nose tip lies within 4 % of the inter-ocular distance of the 68-point model's point 30; the
  placed mouth corners are where an average mouth is, about 0.3 inter-ocular distances from the corners of that
  wide smile.

The default is the 5-point model because of its licence: it and dlib's other models are CC0, while the 68-point
model was trained on iBUG 300-W, whose licence excludes commercial use.

Embeddings are dlib's own: the recogniser aligns its 150 x 150 chip from the predictor's shape itself (either
predictor), and its 128-d output is L2-normalised here so that a dot product is a cosine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ModelFilesError
from .alignment import ARCFACE_TEMPLATE
from .analyzer import DetectedFace, FaceAnalyzer

DETECTORS = ("hog", "cnn")
LANDMARKS = (5, 68)
FILES = {
    "cnn": "mmod_human_face_detector.dat",
    5: "shape_predictor_5_face_landmarks.dat",
    68: "shape_predictor_68_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}
# Photos smaller than this are doubled before detection (HOG's smallest face is 80 px; doubled, 40 px); larger ones
# are not, which keeps detection on a 1024-px image near 0.1 s on one CPU core instead of 0.35 s.
UPSAMPLE_BELOW = 1024
INSTALL = "pip install 'lcmla[faces]' (dlib-bin and face_recognition_models)"


def is_installed() -> bool:
    """dlib and the model-file package are importable (neither is imported here)."""
    return all(importlib.util.find_spec(name) is not None for name in ("dlib", "face_recognition_models"))


def default_model_dir() -> Path:
    """The ``models`` folder of the installed ``face_recognition_models`` package.

    Found without importing the package (its ``__init__`` needs ``pkg_resources``, which new setuptools lack).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(f"faces: dlib's model files are not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def parse_options(text: str) -> tuple[str, ...]:
    """``"cnn,68"`` -> ``("cnn", "68")``, refusing anything else than a detector and a landmark count."""
    options = tuple(o.strip() for o in text.split(",") if o.strip())
    known = DETECTORS + tuple(str(n) for n in LANDMARKS)
    unknown = [o for o in options if o not in known]
    if unknown:
        raise ValueError(f"faces: unknown dlib option(s) {unknown}; expected any of {known}, e.g. 'dlib:cnn,68'")
    return options


def eye_centres_to_five_points(image_left_eye: np.ndarray, image_right_eye: np.ndarray) -> np.ndarray:
    """The template's five points under the similarity transform that takes its eye centres onto these."""
    template = ARCFACE_TEMPLATE[:, 0] + 1j * ARCFACE_TEMPLATE[:, 1]
    left, right = complex(*image_left_eye), complex(*image_right_eye)
    scale_rotation = (right - left) / (template[1] - template[0])  # z -> a z + b is a similarity in the plane
    placed = scale_rotation * (template - template[0]) + left
    return np.stack([placed.real, placed.imag], axis=1).astype(np.float32)


def five_points(shape: np.ndarray) -> np.ndarray:
    """A 5- or 68-point dlib shape (``(n, 2)`` pixels) as the template's five points (module docstring)."""
    if len(shape) == 68:
        return np.stack(
            [shape[36:42].mean(0), shape[42:48].mean(0), shape[30], shape[48], shape[54]]
        ).astype(np.float32)
    if len(shape) == 5:
        return eye_centres_to_five_points(shape[2:4].mean(0), shape[0:2].mean(0))
    raise ValueError(f"shape: expected 5 or 68 dlib landmarks, got {len(shape)}")


class DlibFaceAnalyzer(FaceAnalyzer):
    """dlib detection (``detector="hog"`` or ``"cnn"``), landmarks (``landmarks=5`` or ``68``) and ResNet embedding.

    ``upsample``: times the image is doubled before detection; ``None``: once below :data:`UPSAMPLE_BELOW` px on the
    shorter side (faces down to about 40 px), never above (faces down to about 80 px). ``det_thresh``:
    the lowest detector score kept (HOG scores and CNN confidences; on the astronaut photo, HOG at upsampling 1 gives
    the face 1.16 and a false box on the suit 0.12). ``model_dir``: a folder holding dlib's ``.dat`` files instead of
    the ``face_recognition_models`` package.
    """

    def __init__(
        self,
        detector: str = "hog",
        landmarks: int = 5,
        upsample: int | None = None,
        det_thresh: float = 0.5,
        model_dir: str | Path | None = None,
    ) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"detector: {detector!r} is not one of {DETECTORS}")
        if landmarks not in LANDMARKS:
            raise ValueError(f"landmarks: {landmarks!r} is not one of {LANDMARKS}")
        if upsample is not None and (not isinstance(upsample, int) or upsample < 0):
            raise ValueError(f"upsample: must be None or a non-negative integer, got {upsample!r}")
        try:
            import dlib
        except ImportError as error:
            raise ModelFilesError(f"faces: the dlib backend needs dlib: {INSTALL} ({error})") from None
        folder = Path(model_dir).expanduser() if model_dir is not None else default_model_dir()
        needed = [FILES[landmarks], FILES["recognition"]] + ([FILES["cnn"]] if detector == "cnn" else [])
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            hint = f"; {INSTALL}" if model_dir is None else ""
            raise ModelFilesError(f"faces: {folder} lacks dlib model files {missing}{hint}")
        try:
            if detector == "cnn":
                self._detector = dlib.cnn_face_detection_model_v1(str(folder / FILES["cnn"]))
            else:
                self._detector = dlib.get_frontal_face_detector()
            self._predictor = dlib.shape_predictor(str(folder / FILES[landmarks]))
            self._recogniser = dlib.face_recognition_model_v1(str(folder / FILES["recognition"]))
        except RuntimeError as error:  # dlib's deserialisation errors
            raise ModelFilesError(f"faces: cannot read dlib model files in {folder}: {error}") from None
        self.detector, self.landmarks, self.upsample, self.det_thresh = detector, landmarks, upsample, det_thresh
        self.name = f"dlib:{detector},{landmarks}"

    @classmethod
    def from_options(cls, options: tuple[str, ...]) -> DlibFaceAnalyzer:
        """From :func:`parse_options`' output (``faces="dlib:cnn,68"``)."""
        detector = next((o for o in options if o in DETECTORS), "hog")
        landmarks = next((int(o) for o in options if o.isdigit()), 5)
        return cls(detector=detector, landmarks=landmarks)

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        upsample = self.upsample if self.upsample is not None else int(min(image.size) < UPSAMPLE_BELOW)
        if self.detector == "cnn":
            found = [(d.rect, d.confidence) for d in self._detector(rgb, upsample)]
        else:
            rects, scores, _ = self._detector.run(rgb, upsample, self.det_thresh)
            found = list(zip(rects, scores))
        faces = []
        for rect, score in found:
            if score < self.det_thresh:
                continue
            shape = self._predictor(rgb, rect)
            points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
            embedding = np.asarray(self._recogniser.compute_face_descriptor(rgb, shape), dtype=np.float32)
            faces.append(
                DetectedFace(
                    # dlib's right and bottom are inclusive pixel indices
                    box=np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float32),
                    landmarks=five_points(points),
                    score=float(score),
                    embedding=embedding / np.linalg.norm(embedding),
                )
            )
        return sorted(faces, key=lambda face: face.area, reverse=True)
