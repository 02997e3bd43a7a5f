"""What ``lcmla generate`` and ``lcmla identity create`` check and decide without the model: the model directory's
files, the face photo (it is read, and the face found with the backend the model will use, which loads without the
model), and the names of the images written. Loading a full-size model takes minutes on a CPU; a wrong path or a
photo without a face is reported before that, not after."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from . import validation
from .assets import sample_face_path
from .errors import ModelFilesError
from .faces import AUTO, FaceBackend
from .images import load_rgb
from .model_dir import ModelLayout, validate
from .presets import PRESETS, preset_config

SAMPLE_FACE = "sample"  # --face sample: the photo shipped with lcmla
NUMBERED = re.compile(r"\d+")


def model_layout(model: str) -> ModelLayout | None:
    """The model directory's layout, checked (files, keys, shapes; hashes are left to loading), or ``None`` for an
    embedded preset."""
    if model in PRESETS:
        return None
    if not Path(model).expanduser().is_dir():
        raise ModelFilesError(f"model: {model!r} is neither a model directory nor an embedded preset {PRESETS}")
    return validate(model, verify=False)


def size_multiple(model: str, layout: ModelLayout | None) -> int:
    """What ``--height`` and ``--width`` must be multiples of for ``model``, from its configs (no weights read)."""
    configs = preset_config(model) if layout is None else layout.configs
    return validation.size_multiple(configs["unet"], configs["vae"])


def has_tiny_vae(model: str, layout: ModelLayout | None) -> bool:
    """Whether ``model`` brings its own tiny VAE: a preset draws a random one; a model directory has none."""
    return layout is None and "tiny_vae" in preset_config(model)


def face_path(face: str | None) -> Path:
    """The file a ``--face`` value names; no value and ``sample`` name the bundled photo."""
    return sample_face_path() if face in (None, SAMPLE_FACE) else Path(face).expanduser()


def face_photo(face: str | None, faces: str, layout: ModelLayout | None, on_multiple: str = "largest") -> Image.Image:
    """The photo of ``--face``, read, with its face found by the backend that ``faces`` picks for this model
    (``NoFaceError`` otherwise; the largest face counts, as in generation, unless ``on_multiple="error"``)."""
    image = load_rgb(face_path(face))
    if faces == AUTO and layout is not None and "faces" in layout.components:
        faces = str(layout.components["faces"].path)  # what from_pretrained picks: the directory's own pack
    analyzer = FaceBackend.parse(faces).open()
    if analyzer is not None:
        analyzer.find_face(image, on_multiple)
    return image


def image_paths(out: Path, count: int, overwrite: bool) -> list[Path]:
    """Names for ``count`` new images in ``out``: ``000.png``, ``001.png``, ... continuing after the highest number
    already there, so earlier images are kept; with ``overwrite``, from ``000.png`` again."""
    taken = [int(p.stem) for p in out.glob("*.png") if NUMBERED.fullmatch(p.stem)] if out.is_dir() else []
    first = 0 if overwrite or not taken else max(taken) + 1
    return [out / f"{index:03d}.png" for index in range(first, first + count)]
