"""Face alignment for the identity loss: 5-point landmarks and a differentiable similarity warp to ArcFace's crop.

Landmarks are constants (from a detector, or a fixed template for data whose faces are already centred); the warp
from the image to the 112x112 ArcFace crop is ``grid_sample`` on the image, so gradients reach the image's pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lcmla_sdk.faces import ARCFACE_TEMPLATE, InsightFaceAnalyzer, check_face_pack

from .config import FacesConfig

ARCFACE_SIZE = 112  # ARCFACE_TEMPLATE's crop side


class TemplateLandmarks:
    """For faces that are already centred and aligned (synthetic sets): the ArcFace template scaled to the image.

    Deterministic and detector-free: it never reports a missing face.
    """

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        return ARCFACE_TEMPLATE * np.array([width, height], dtype=np.float32) / ARCFACE_SIZE


class DetectorLandmarks:
    """Landmarks of the largest face found by the SDK's :class:`~lcmla_sdk.faces.InsightFaceAnalyzer` on a local
    insightface pack (never downloads); ``None`` when there is no face.

    The analyzer is built on first use, so the object can be sent to data-loader workers before that; the pack is
    checked at once, so a wrong path fails before training starts.
    """

    def __init__(self, pack: str | Path, det_size: int = 640, det_thresh: float = 0.5) -> None:
        self.pack = Path(pack).expanduser().resolve()
        check_face_pack(self.pack)
        self.det_size, self.det_thresh = det_size, det_thresh
        self._analyzer = None

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        if self._analyzer is None:
            self._analyzer = InsightFaceAnalyzer(self.pack, self.det_thresh, (self.det_size, self.det_size))
        faces = self._analyzer.detect(Image.fromarray(image))
        return faces[0].landmarks if faces else None  # largest first


def landmark_source(faces: FacesConfig) -> TemplateLandmarks | DetectorLandmarks:
    """The landmark source ``faces.landmarks`` names; a detector's pack is checked at once."""
    if faces.landmarks == "template":
        return TemplateLandmarks()
    return DetectorLandmarks(faces.pack, faces.det_size, faces.det_thresh)


def similarity_to_template(landmarks: torch.Tensor, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """Least-squares similarity transforms (Umeyama) taking ``(B, 5, 2)`` landmarks onto the ArcFace template.

    Returns ``(B, 2, 3)`` matrices in pixel coordinates (what insightface's ``estimate_norm`` computes).
    """
    src = landmarks.detach().to(torch.float64)
    dst = torch.as_tensor(ARCFACE_TEMPLATE * (size / ARCFACE_SIZE), dtype=torch.float64, device=src.device)
    src_mean, dst_mean = src.mean(1, keepdim=True), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T.unsqueeze(0) @ src_c / src.shape[1]
    u, singular, vh = torch.linalg.svd(covariance)
    # Reflection guard: the transform must be a rotation, never a mirror image.
    sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    d = torch.stack([torch.ones_like(sign), sign], dim=1)
    rotation = u @ torch.diag_embed(d) @ vh
    scale = (singular * d).sum(1) / src_c.pow(2).sum((1, 2)).div(src.shape[1])
    linear = scale.view(-1, 1, 1) * rotation
    shift = dst_mean - (linear @ src_mean.transpose(1, 2)).squeeze(2)
    return torch.cat([linear, shift.unsqueeze(2)], dim=2)


def align_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """Warp ``(B, C, H, W)`` images to ``size`` x ``size`` ArcFace crops by the similarity from their landmarks.

    Bilinear sampling with zero padding, like ``cv2.warpAffine`` in insightface's ``norm_crop``; differentiable in
    ``images``.
    """
    batch, _, height, width = images.shape
    forward = similarity_to_template(landmarks, size)
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=forward.dtype, device=forward.device).expand(batch, 1, 3)
    inverse = torch.linalg.inv(torch.cat([forward, bottom], dim=1))  # crop pixel -> image pixel
    crop_from_normalized = _normalized_to_pixels(size, size, forward)
    image_to_normalized = torch.linalg.inv(_normalized_to_pixels(width, height, forward))
    theta = (image_to_normalized @ inverse @ crop_from_normalized)[:, :2]
    grid = F.affine_grid(theta.to(images.dtype), [batch, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _normalized_to_pixels(width: int, height: int, like: torch.Tensor) -> torch.Tensor:
    """grid_sample's normalised coordinates (align_corners=False) -> pixel coordinates with centres at integers."""
    matrix = torch.tensor(
        [[width / 2, 0.0, (width - 1) / 2], [0.0, height / 2, (height - 1) / 2], [0.0, 0.0, 1.0]],
        dtype=like.dtype,
        device=like.device,
    )
    return matrix.expand(like.shape[0], 3, 3)
