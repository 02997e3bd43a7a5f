"""lcmla: fast LCM-Lookahead face personalization for SDXL."""

from .guidance import Guidance
from .networks import Denoiser, ImageAdapter, KVEncoder
from .errors import (
    IdentityMismatchError,
    InvalidImageError,
    LcmlaError,
    ModelFilesError,
    MultipleFacesError,
    NoFaceError,
)
from .identity import Identity
from .pipeline import FaceEncoding, Personalizer

__version__ = "0.1.0"
__all__ = [
    "Denoiser", "FaceEncoding", "Guidance", "Identity", "IdentityMismatchError", "ImageAdapter", "InvalidImageError",
    "KVEncoder", "LcmlaError", "ModelFilesError", "MultipleFacesError", "NoFaceError", "Personalizer", "__version__",
]  # fmt: skip
