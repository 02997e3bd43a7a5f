"""Which face analysis a model uses: :class:`FaceBackend` turns the ``faces`` argument of
:meth:`~lcmla_sdk.Personalizer.from_pretrained` into an analyzer (:class:`~lcmla_sdk.faces.analyzer.FaceAnalyzer`).
Backends, both offline:

* ``dlib`` (:mod:`~lcmla_sdk.faces.dlib_backend`): dlib's HOG or CNN detector, shape predictor and 128-d ResNet
  embedding, with the model files of the ``face_recognition_models`` package (the ``faces`` extra). The default.
* ``insightface`` (:mod:`~lcmla_sdk.faces.insightface_backend`): a local pack of insightface ONNX models
  (a detector and an ArcFace recognition model).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from . import dlib_backend
from .analyzer import FaceAnalyzer
from .insightface_backend import InsightFaceAnalyzer

AUTO = "auto"
_no_check_said = False  # the warning below is given once per process
FACES_FORMS = "'auto', 'dlib' (or 'dlib:cnn', 'dlib:68', 'dlib:cnn,68'), 'insightface:DIR', a pack folder, or None"


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
    def parse(cls, faces: str | Path | FaceBackend | None) -> FaceBackend:
        if isinstance(faces, FaceBackend):
            return faces
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
            return cls("dlib", options=dlib_backend.parse_options(text.partition(":")[2]))
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
            return dlib_backend.DlibFaceAnalyzer.from_options(self.options)
        if self.kind == "auto":
            if dlib_backend.is_installed():
                return dlib_backend.DlibFaceAnalyzer()
            if not _no_check_said:
                _no_check_said = True
                warnings.warn(
                    "faces: no face check was made (the photo may show no face, or several): dlib is not installed. "
                    "Install the face backend with pip install 'lcmla[faces]', or pass faces=None to silence this.",
                    stacklevel=4,
                )
        return None
