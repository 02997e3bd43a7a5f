"""lcmla: fast LCM-Lookahead face personalization for SDXL."""

from .guidance import Guidance
from .networks import Denoiser, ImageAdapter, KVEncoder
from .pipeline import FaceEncoding, Personalizer

__version__ = "0.1.0"
__all__ = ["Denoiser", "FaceEncoding", "Guidance", "ImageAdapter", "KVEncoder", "Personalizer", "__version__"]
