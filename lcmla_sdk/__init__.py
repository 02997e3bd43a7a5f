"""lcmla: fast LCM-Lookahead face personalization for SDXL.

The public names are imported on first use (PEP 562), so that ``import lcmla_sdk.cli`` (``lcmla --help``) does not
load torch and diffusers; ``from lcmla_sdk import Personalizer`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .diffusers_pipeline import LCMLookaheadPipeline
    from .guidance import Guidance
    from .identity import Identity
    from .networks import Denoiser, ImageAdapter, KVEncoder
    from .pipeline import Personalizer

__version__ = "0.1.2"
# Public name -> the module that defines it, imported when the name is first read.
_LAZY = {
    "Denoiser": "networks", "ImageAdapter": "networks", "KVEncoder": "networks", "Guidance": "guidance",
    "Identity": "identity", "Personalizer": "pipeline", "LCMLookaheadPipeline": "diffusers_pipeline",
}  # fmt: skip
__all__ = [
    "Denoiser", "Guidance", "Identity", "IdentityMismatchError", "ImageAdapter", "IntegrityError",
    "InvalidImageError", "KVEncoder", "LCMLookaheadPipeline", "LcmlaError", "ModelFilesError", "MultipleFacesError", "NoFaceError",
    "Personalizer", "WriteError", "__version__",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
