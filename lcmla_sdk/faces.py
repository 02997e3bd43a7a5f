"""Face detection, 5-point landmarks and face-recognition embeddings: one interface, two backends.

:class:`~lcmla_sdk.face_analyzer.FaceAnalyzer` is the interface (``detect`` -> every face, largest first;
``find_face`` -> the one to use). Backends, both offline:

* ``dlib`` (:mod:`lcmla_sdk.faces_dlib`): dlib's HOG or CNN detector, shape predictor and 128-d ResNet embedding,
  with the model files of the ``face_recognition_models`` package (the ``faces`` extra). The default.
* ``insightface`` (:class:`InsightFaceAnalyzer`): a local pack of insightface ONNX models, e.g. the contents of
  ``buffalo_l``: a detector (``det_10g.onnx``) and an ArcFace recognition model (``w600k_r50.onnx``); other models
  in it are ignored. insightface's ``FaceAnalysis`` is handed the folder itself, so it never looks for, nor
  downloads, a named pack.

:class:`FaceBackend` turns the ``faces`` argument of :meth:`~lcmla_sdk.Personalizer.from_pretrained` into one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import faces_dlib
from .errors import ModelFilesError
from .face_analyzer import ARCFACE_TEMPLATE, DetectedFace, FaceAnalyzer

PACK_CONTENTS = "a detector such as det_10g.onnx and an ArcFace recognition model such as w600k_r50.onnx"
AUTO = "auto"
_no_check_said = False  # the warning below is given once per process
FACES_FORMS = "'auto', 'dlib' (or 'dlib:cnn', 'dlib:68', 'dlib:cnn,68'), 'insightface:DIR', a pack folder, or None"


class InsightFaceAnalyzer(FaceAnalyzer):
    """insightface ``FaceAnalysis`` (detection + ArcFace recognition) over the ONNX files of ``pack_dir``."""

    def __init__(
        self,
        pack_dir: str | Path,
        det_thresh: float = 0.5,
        det_size: tuple[int, int] = (640, 640),
        providers: list[str] | None = None,
    ) -> None:
        self.pack_dir = Path(pack_dir).expanduser().resolve()
        self.name = f"insightface:{self.pack_dir}"
        self.det_thresh = det_thresh
        check_face_pack(self.pack_dir)
        try:
            from insightface.app import FaceAnalysis
        except ImportError as error:
            raise ModelFilesError(f"face analysis needs insightface: pip install 'lcmla[faces]' ({error})") from None

        providers = providers or ["CPUExecutionProvider"]
        try:
            app = FaceAnalysis(
                name=str(self.pack_dir), allowed_modules=["detection", "recognition"], providers=providers
            )
        except AssertionError:  # insightface asserts that a detector was found
            app = None
        except Exception as error:  # onnxruntime raises its own types for unreadable model files
            raise ModelFilesError(f"face pack {self.pack_dir}: cannot load its ONNX models: {error}") from None
        missing = [task for task in ("detection", "recognition") if app is None or task not in app.models]
        if missing:
            raise ModelFilesError(
                f"face pack {self.pack_dir}: no {' or '.join(missing)} model among "
                f"{sorted(p.name for p in self.pack_dir.glob('*.onnx'))}; expected {PACK_CONTENTS}"
            )
        ctx_id = 0 if any(p.startswith("CUDA") for p in providers) else -1
        app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=det_size)
        self.app = app

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        faces = [
            DetectedFace(
                box=np.asarray(f.bbox, dtype=np.float32),
                landmarks=np.asarray(f.kps, dtype=np.float32),
                score=float(f.det_score),
                embedding=np.asarray(f.normed_embedding, dtype=np.float32),
            )
            for f in self.app.get(bgr)
        ]
        return sorted(faces, key=lambda face: face.area, reverse=True)


@dataclass(frozen=True)
class FaceBackend:
    """Which face analysis a model uses, parsed from a ``faces=`` value (:data:`FACES_FORMS`).

    ``"auto"``: the model directory's insightface pack if it has one, else dlib when it is installed, else no
    detection (said once, with how to install it). ``None`` (or ``"none"``): no detection, explicitly.
    ``"dlib[:options]"``: options ``hog`` (default) or ``cnn`` detector, ``5`` (default) or ``68``-point landmarks.
    ``"insightface:DIR"``, or any other string or path: an insightface pack folder.
    """

    kind: str  # "auto", "off", "dlib" or "insightface"
    pack_dir: Path | None = None
    options: tuple[str, ...] = ()

    @classmethod
    def parse(cls, faces: str | Path | None) -> FaceBackend:
        if faces is None:
            return cls("off")
        if isinstance(faces, Path):
            return cls("insightface", faces.expanduser())
        if not isinstance(faces, str) or not faces.strip():
            raise ValueError(f"faces: expected {FACES_FORMS}; got {faces!r}")
        text = faces.strip()
        if text in (AUTO, "none"):
            return cls("auto" if text == AUTO else "off")
        if text == "dlib" or text.startswith("dlib:"):
            return cls("dlib", options=faces_dlib.parse_options(text.partition(":")[2]))
        pack = text.removeprefix("insightface:")
        if not pack:
            raise ValueError("faces: 'insightface:' needs a pack folder, e.g. 'insightface:models/buffalo_l'")
        return cls("insightface", Path(pack).expanduser())

    def open(self, providers: list[str] | None = None) -> FaceAnalyzer | None:
        """The analyzer (model files are read now), or ``None`` for no detection."""
        global _no_check_said
        if self.kind == "insightface":
            return InsightFaceAnalyzer(self.pack_dir, providers=providers)
        if self.kind == "dlib":
            return faces_dlib.DlibFaceAnalyzer.from_options(self.options)
        if self.kind == "auto":
            if faces_dlib.is_installed():
                return faces_dlib.DlibFaceAnalyzer()
            if not _no_check_said:
                _no_check_said = True
                warnings.warn(
                    "faces: no face check was made (the photo may show no face, or several): dlib is not installed. "
                    "Install the face backend with pip install 'lcmla[faces]', or pass faces=None to silence this.",
                    stacklevel=4,
                )
        return None


def check_face_pack(pack_dir: Path) -> None:
    """Fail before any ONNX session starts if the folder is missing or holds no ONNX models."""
    if not pack_dir.is_dir():
        raise ModelFilesError(f"face pack {pack_dir}: no such folder; expected one holding {PACK_CONTENTS}")
    if not any(pack_dir.glob("*.onnx")):
        raise ModelFilesError(f"face pack {pack_dir}: no .onnx files; expected {PACK_CONTENTS}")


def align_face(image: Image.Image, landmarks: np.ndarray, size: int, face_fraction: float = 0.5) -> Image.Image:
    """A ``size`` square crop rotated and scaled so the 5 landmarks sit on ArcFace's template.

    The template's 112-px face box fills the middle ``face_fraction`` of the crop, which leaves hair and chin in.
    """
    import cv2

    target = (ARCFACE_TEMPLATE / 112.0 - 0.5) * (size * face_fraction) + size / 2.0
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks, np.float32), target, method=cv2.LMEDS)
    warped = cv2.warpAffine(
        np.asarray(image.convert("RGB")), matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
    )
    return Image.fromarray(warped)
