"""Files shipped with the package: the sample face, the default evaluation prompts, the tiny preset's tokenizer."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def sample_face_path() -> Path:
    """The bundled face photo (256x256 JPEG, a crop of scikit-image's public-domain astronaut picture); the CLI's
    ``--face sample``, and what ``lcmla generate`` uses without ``--face``."""
    return FOLDER / "sample_face.jpg"
