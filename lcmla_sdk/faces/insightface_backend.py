"""The insightface face backend: a local pack of insightface ONNX models, e.g. the contents of ``buffalo_l``: a
detector (``det_10g.onnx``) and an ArcFace recognition model (``w600k_r50.onnx``); other models in it are ignored.
insightface's ``FaceAnalysis`` is handed the folder itself, so it never looks for, nor downloads, a named pack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ModelFilesError
from .analyzer import DetectedFace, FaceAnalyzer

PACK_CONTENTS = "a detector such as det_10g.onnx and an ArcFace recognition model such as w600k_r50.onnx"


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


def check_face_pack(pack_dir: Path) -> None:
    """Fail before any ONNX session starts if the folder is missing or holds no ONNX models."""
    if not pack_dir.is_dir():
        raise ModelFilesError(f"face pack {pack_dir}: no such folder; expected one holding {PACK_CONTENTS}")
    if not any(pack_dir.glob("*.onnx")):
        raise ModelFilesError(f"face pack {pack_dir}: no .onnx files; expected {PACK_CONTENTS}")
