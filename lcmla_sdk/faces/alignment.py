"""5-point face alignment: the template every backend's landmarks follow, and the crop that puts a face on it."""

from __future__ import annotations

import numpy as np
from PIL import Image

# insightface's ArcFace landmark template in a 112 x 112 crop: the centres of the image-left and image-right eyes,
# the nose tip, the image-left and image-right mouth corners. Every backend reports its landmarks in this order.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


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
