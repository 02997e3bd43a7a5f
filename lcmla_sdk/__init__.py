"""lcmla: fast LCM-Lookahead face personalization for SDXL."""

from .guidance import Guidance
from .networks import Denoiser, ImageAdapter, KVEncoder
from .errors import (
    IdentityMismatchError,
    IntegrityError,
    InvalidImageError,
    LcmlaError,
    ModelFilesError,
    MultipleFacesError,
    NoFaceError,
    WriteError,
)
from .identity import Identity
from .pipeline import Personalizer

__version__ = "0.1.0"
__all__ = [
    "Denoiser", "Guidance", "Identity", "IdentityMismatchError", "ImageAdapter", "IntegrityError",
    "InvalidImageError", "KVEncoder", "LcmlaError", "ModelFilesError", "MultipleFacesError", "NoFaceError",
    "Personalizer", "WriteError", "__version__",
]  # fmt: skip
