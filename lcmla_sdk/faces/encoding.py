"""Photos of one person -> :class:`~lcmla_sdk.identity.Identity`: each photo through the model's face backend, then
the image adapter's tokens and the VAE's latents of the prepared references."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .. import validation
from ..errors import InvalidImageError, ModelFilesError
from ..identity import Identity
from ..images import CROPS, FACE_RESIZES, FaceInput, clip_pixels, vae_pixels
from .analyzer import ON_MULTIPLE, DetectedFace, FaceAnalyzer
from .backend import FaceBackend
from .references import prepare_references


class FaceEncoder:
    """The face backend of one model (started on first use, one detection at a time) and its encoding of photos;
    the image adapter is given per call (it can be replaced by an exported one)."""

    def __init__(self, backend: FaceBackend, vae: torch.nn.Module, clip_size: int, face_size: int, fingerprint: str,
                 device: torch.device, dtype: torch.dtype) -> None:  # fmt: skip
        self.backend, self.vae = backend, vae
        self.clip_size, self.face_size, self.fingerprint = clip_size, face_size, fingerprint
        self.device, self.dtype = device, dtype
        self._analyzer: FaceAnalyzer | None = None
        self._lock = threading.RLock()

    @property
    def analyzer(self) -> FaceAnalyzer | None:
        """The backend's analyzer, started on first use; ``None`` when detection is off."""
        with self._lock:
            if self._analyzer is None:
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else None
                self._analyzer = self.backend.open(providers)
            return self._analyzer

    def __call__(self, images: FaceInput | Sequence[FaceInput], adapter: Callable, crop: str, on_multiple: str,
                 face_resize: str) -> Identity:  # fmt: skip
        """One :class:`Identity` of the photo(s) ``images`` (arguments as :meth:`Personalizer.encode_face` describes
        them), checked before any work: the choices, and the memory the VAE needs for every photo."""
        photos = list(images) if isinstance(images, (list, tuple)) else [images]
        if not photos:
            raise InvalidImageError("face: no image given")
        validation.choice(crop, "crop", CROPS)
        validation.choice(on_multiple, "on_multiple", ON_MULTIPLE)
        validation.choice(face_resize, "face_resize", FACE_RESIZES)
        validation.check_memory(validation.vae_bytes(self, len(photos), self.face_size, self.face_size), self.device,
                                f"face ({len(photos)} photos)", "encode fewer photos at once")  # fmt: skip
        analyzer = self.analyzer
        if analyzer is None and (crop == "face" or on_multiple == "error"):
            raise ModelFilesError(
                "faces: crop='face' and on_multiple='error' need face detection, which is off for this model: "
                "install the dlib backend (pip install 'lcmla[faces]') or pass faces='dlib' or an insightface pack "
                "folder to from_pretrained"
            )
        references = prepare_references(photos, analyzer, self.face_size, crop=crop, on_multiple=on_multiple,
                                        face_resize=face_resize, lock=self._lock)  # fmt: skip
        pictures = references.pictures
        clip = torch.cat([clip_pixels(p, self.clip_size) for p in pictures]).to(self.device, self.dtype)
        cond, uncond = adapter(clip)
        pixels = torch.cat([vae_pixels(p, self.face_size) for p in pictures]).to(self.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        return Identity(
            cond_tokens=cond.mean(0, keepdim=True), uncond_tokens=uncond[:1], latent_mean=dist.mean.float(),
            latent_std=dist.std.float(), sources=references.sources, model_fingerprint=self.fingerprint, crop=crop,
            face_resize=face_resize, **detection_fields(references.detections, analyzer),
        )  # fmt: skip


def detection_fields(detections: Sequence[DetectedFace | None], analyzer: FaceAnalyzer | None) -> dict[str, Any]:
    """:class:`Identity` fields recording one detection per reference (``None`` entries with detection off)."""
    if analyzer is None:
        return {"boxes": [None] * len(detections), "landmarks": [None] * len(detections)}
    return {
        "face_embeddings": torch.from_numpy(np.stack([d.embedding for d in detections])),
        "boxes": [[float(v) for v in d.box] for d in detections],
        "landmarks": [np.asarray(d.landmarks, dtype=float).tolist() for d in detections],
        "face_backend": analyzer.name,
    }
