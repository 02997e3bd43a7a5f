"""Image conversion at the SDK's edges: user input -> RGB PIL -> model tensors, and back."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .assets import sample_face_path
from .errors import InvalidImageError

# CLIP's normalisation (the constants of CLIPImageProcessor for every OpenAI/OpenCLIP ViT).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FaceInput = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]

# Below this side there is no face to see; above MAX_PIXELS Pillow's decompression-bomb guard applies.
MIN_SIDE = 16
# How a reference photo becomes the model's square: "squash" (the authors') resizes the whole photo, "crop" cuts the
# centre square.
FACE_RESIZES = ("squash", "crop")
# What of a reference photo the image encoder and the VAE see: "none" the photo, "face" its aligned face crop.
CROPS = ("none", "face")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
FLOAT_SLACK = 1e-3  # float images a resize left just outside [0, 1] are clipped, not refused


def sample_face() -> Image.Image:
    """The face photo shipped with the package (:func:`lcmla_sdk.assets.sample_face_path`), as an RGB image."""
    with Image.open(sample_face_path()) as image:
        return image.convert("RGB")


def load_rgb(face: FaceInput) -> Image.Image:
    """Any supported face input as an upright 8-bit RGB image.

    Accepts a path, encoded bytes, a binary file object, a PIL image in any common mode (RGB, RGBA, L, LA, P, CMYK,
    I;16, I, F, ...) or an ``HxW``/``HxWxC`` array (C in 1, 3, 4; uint8, uint16, or float in [0, 1]). EXIF
    orientation is applied; transparency is composited over white. Raises :class:`InvalidImageError`.
    """
    if isinstance(face, (str, os.PathLike)):
        path = Path(face)
        if not path.is_file():
            raise InvalidImageError(f"face: no such image file: {path}")
        image = _decode(lambda: Image.open(path), f"file {path}")
    elif isinstance(face, (bytes, bytearray, memoryview)):
        data = bytes(face)
        image = _decode(lambda: Image.open(io.BytesIO(data)), f"{len(data)} bytes")
    elif hasattr(face, "read"):
        image = _decode(lambda: Image.open(face), "file object")
    elif isinstance(face, Image.Image):
        image = _decode(lambda: face, "PIL image")
    elif isinstance(face, np.ndarray):
        image = _array_to_image(face)
    else:
        raise InvalidImageError(
            f"face: expected a path, bytes, file object, PIL image or numpy array, got {type(face).__name__}"
        )
    if min(image.size) < MIN_SIDE:
        raise InvalidImageError(f"face: the image is {image.width}x{image.height}; both sides must be >= {MIN_SIDE}")
    return image


def _decode(open_image, what: str) -> Image.Image:
    try:
        image = open_image()
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # Pillow's own words for an unknown format name its internal buffer object, which means nothing to a caller.
        reason = "no image format Pillow reads" if isinstance(error, Image.UnidentifiedImageError) else error
        raise InvalidImageError(f"face: cannot read an image from {what}: {reason}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: high-bit-depth modes are rescaled (Pillow would clip them), alpha goes over white."""
    if image.mode in SIXTEEN_BIT_MODES + ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(array / _full_scale(image.mode, array) * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _full_scale(mode: str, array: np.ndarray) -> float:
    """White level of a high-bit-depth image: 16-bit modes are 65535; ``I`` and ``F`` are judged by their peak."""
    peak = float(array.max(initial=0.0))
    if mode in SIXTEEN_BIT_MODES:
        return 65535.0
    if mode == "F" and peak <= 1.0:
        return 1.0
    return 255.0 if peak <= 255.0 else 65535.0


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InvalidImageError(f"face: array must be HxW or HxWxC with C in (1, 3, 4), got shape {array.shape}")
    if array.dtype == np.uint16:
        array = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidImageError("face: float array contains NaN or infinity")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < -FLOAT_SLACK or high > 1.0 + FLOAT_SLACK:  # clipping would give a white (or black) face
            hint = "; for values in 0..255 pass a uint8 array or divide by 255" if low >= 0 and high <= 255 else ""
            raise InvalidImageError(f"face: a float array must hold values in [0, 1], found {low:g} .. {high:g}{hint}")
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InvalidImageError(f"face: array dtype must be uint8, uint16 or float in [0, 1], got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def pixel_sha256(image: Image.Image) -> str:
    """Hash of the decoded RGB pixels: the same picture gives the same hash whatever form it came in."""
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(np.asarray(image, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def squash(image: Image.Image, size: int) -> Image.Image:
    """The whole photo resized to ``size`` x ``size`` without keeping its aspect ratio: the authors' reference
    preprocessing (``Image.resize((1024, 1024))``, Pillow's default bicubic filter), before the VAE and CLIP see it."""
    return image.resize((size, size), Image.Resampling.BICUBIC)


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
    """CLIPImageProcessor's preprocessing: bicubic shorter-side resize, centre crop, normalise. ``(1, 3, s, s)``.

    A square image (e.g. from :func:`squash`) is only resized."""
    pixels = _to_tensor(_square_crop(image, size, Image.Resampling.BICUBIC))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def vae_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The face as the VAE sees it: a ``size`` square in [-1, 1], ``(1, 3, size, size)``; a photo that is not
    square is centre-cropped (use :func:`squash` first for the authors' whole-photo resize)."""
    return (_to_tensor(_square_crop(image, size, Image.Resampling.LANCZOS)) * 2.0 - 1.0).unsqueeze(0)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in [-1, 1] -> float32 in [0, 1] (``output="pt"``)."""
    return (images.float().clamp(-1, 1) + 1) / 2


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` or ``(3, H, W)`` in [-1, 1] -> ``(N, H, W, 3)`` or ``(H, W, 3)`` uint8 (channels last)."""
    array = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return array.movedim(-3, -1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(N, 3, H, W)`` in [-1, 1] -> RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]
