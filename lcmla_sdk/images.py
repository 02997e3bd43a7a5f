"""Image conversion at the SDK's edges: user input -> RGB PIL -> model tensors, and back."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

# CLIP's normalisation (the constants of CLIPImageProcessor for every OpenAI/OpenCLIP ViT).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FaceInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def sample_face() -> Image.Image:
    """A face photo shipped with the package (a crop of scikit-image's public-domain astronaut picture)."""
    with resources.as_file(resources.files("lcmla_sdk").joinpath("assets/sample_face.jpg")) as path:
        return Image.open(path).convert("RGB")


def load_rgb(face: FaceInput) -> Image.Image:
    """Accept a path, a PIL image or an ``HxW``/``HxWxC`` array (uint8, or float in [0, 1]) as RGB."""
    if isinstance(face, (str, os.PathLike)):
        path = Path(face)
        if not path.is_file():
            raise ValueError(f"face: no such image file: {path}")
        with Image.open(path) as image:
            return image.convert("RGB")
    if isinstance(face, Image.Image):
        return face.convert("RGB")
    if isinstance(face, np.ndarray):
        array = face
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ValueError(f"face: array must be HxW or HxWxC with C in (1, 3, 4), got shape {array.shape}")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        return Image.fromarray(array).convert("RGB")
    raise TypeError(f"face: expected a path, PIL image or numpy array, got {type(face).__name__}")


def _square_crop(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop a ``size`` x ``size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), resample)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """CLIPImageProcessor's preprocessing: bicubic shorter-side resize, centre crop, normalise. ``(1, 3, s, s)``."""
    pixels = _to_tensor(_square_crop(image, size, Image.Resampling.BICUBIC))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def vae_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The face as the VAE sees it: a ``size`` square in [-1, 1], ``(1, 3, size, size)``."""
    return (_to_tensor(_square_crop(image, size, Image.Resampling.LANCZOS)) * 2.0 - 1.0).unsqueeze(0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(N, 3, H, W)`` in [-1, 1] -> RGB PIL images."""
    array = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
