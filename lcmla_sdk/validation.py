"""Argument checks at the SDK's doors (``generate``, ``encode_face``, ``from_pretrained``, ``Identity.load``, the CLI),
run before any work. Every error is a ``ValueError`` whose message starts with the argument's name.

Types: integers are Python or numpy integers (never bools, never floats, even whole ones); flags are ``True`` or
``False`` (numpy bools too; ``"false"`` or ``0`` are refused, not taken for a flag); numbers are ints or floats
(numpy too) and finite.

Ranges:

* ``seed``: 0 .. 2**64 - 1, what ``torch.Generator.manual_seed`` takes; with one seed for several images, the last
  image's ``seed + i`` must stay in range too.
* ``steps``: :data:`STEPS` per mode. Quality (DPM-Solver++) up to 150: three times the authors' 50; beyond, SDXL's
  "leading" timestep spacing starts ever further from pure noise (t=801 at 200 steps, 501 at 500) and at 1000 every
  timestep collapses to one. Fast (LCM) up to 50, the ``original_inference_steps`` the LCM scheduler can run.
* ``guidance`` weights and ``adapter_scale``: 0 .. :data:`MAX_WEIGHT`.
* ``height``/``width``: multiples of the model's size step, at most :data:`MAX_SIDE`.
* Memory: :func:`generation_bytes` estimates the activations of one sampling step and of the VAE, which dominate a
  call's memory; a call whose estimate exceeds :func:`memory_budget` is refused with the estimate, instead of
  swapping or dying in the allocator. The budget is the memory free at the call (CUDA: free device memory plus
  PyTorch's cached blocks; CPU: the kernel's ``MemAvailable``), or ``LCMLA_MEMORY_BUDGET_GIB`` when set.
"""

from __future__ import annotations

import math
import numbers
import os
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import IdentityMismatchError

STEPS = {"quality": (1, 150), "fast": (1, 50)}
MAX_SEED = 2**64 - 1
MAX_WEIGHT = 100.0
MAX_SIDE = 8192  # pixels; eight times SDXL's training size
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Live activation values per latent pixel and first-level UNet channel (skip connections of every level, the
# transformer blocks' feed-forward and, on a CPU, attention scores), and per image pixel and second-level VAE channel
# (its decoder upsamples that level to full size), for one more image than the batch (buffers every decode keeps).
# Fitted to the peak memory of tiny-preset calls on a CPU, within 2x (tests/test_validation.py checks it); SDXL has
# the same block layout.
UNET_ACTIVATIONS = 40
VAE_ACTIVATIONS = 4


# ------------------------------------------------------------------ types
def integer(value: Any, name: str, low: int | None = None, high: int | None = None, what: str = "") -> int:
    """``what`` names the part of the argument that ``value`` is (e.g. ``"seed 3: "``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: {what}expected an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low} .. {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name}: {what}{value} is out of range ({bounds})")
    return value


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def number(value: Any, name: str, low: float | None = None, high: float | None = None, what: str = "") -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: {what}expected a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: {what}{value!r} is out of range ({low} .. {high})")
    return value


def choice(value: Any, name: str, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: {value!r} is not one of {tuple(options)}")
    return value


def path(value: Any, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"{name}: expected a path (str or os.PathLike), got {value!r} ({type(value).__name__})")
    return Path(value).expanduser()


def strings(value: Any, name: str) -> list[str]:
    """A string or a non-empty list/tuple of strings, as a list of plain ``str``. Every string of valid Unicode is
    taken (empty, very long, any script, emoji, control characters); a lone surrogate (``"\\ud800"``, what
    ``bytes.decode(errors="surrogateescape")`` leaves) is refused here, since the tokenizers raise a ``TypeError``
    on it."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not items or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{name}: expected a string or a non-empty list of strings, got {reprlib.repr(value)}")
    for index, item in enumerate(items):
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as error:
            where = f"string {index}, " if len(items) > 1 or not isinstance(value, str) else ""
            raise ValueError(
                f"{name}: {where}character {error.start} is a lone surrogate ({item[error.start]!a}), not valid "
                "Unicode text"
            ) from None
    return [str(item) for item in items]


# ------------------------------------------------------------------ generation arguments
def seeds(seed: Any, count: int) -> list[int | torch.Generator] | None:
    """``None`` (random seeds), one seed for ``count`` images (``seed``, ``seed + 1``, ...) or a seed per image;
    a ``torch.Generator`` (drawn from by every image in turn) or one per image instead of seeds."""
    if seed is None:
        return None
    if isinstance(seed, torch.Generator):
        return [seed] * count
    if isinstance(seed, (list, tuple, np.ndarray)):
        values = [s if isinstance(s, torch.Generator) else integer(s, "seed", 0, MAX_SEED, f"seed {i}: ")
                  for i, s in enumerate(seed)]  # fmt: skip
        if len(values) != count:
            given, images = f"{len(values)} seed{'s' * (len(values) != 1)}", f"{count} image{'s' * (count != 1)}"
            raise ValueError(f"seed: {given} given for {images} (prompts x num_images)")
        return values
    first = integer(seed, "seed", 0, MAX_SEED)
    if first + count - 1 > MAX_SEED:
        raise ValueError(f"seed: {first} + {count - 1} for the last image is beyond {MAX_SEED}")
    return [first + i for i in range(count)]


def steps(value: Any, mode: str, default: int) -> int:
    low, high = STEPS[mode]
    return default if value is None else integer(value, "steps", low, high, f"{mode} mode: ")


def guidance(value: Any) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != 3:
        raise ValueError(f"guidance: expected three weights (no_kv, full, kv), got {value!r}")
    names = ("no_kv", "full", "kv")
    return tuple(number(w, "guidance", 0.0, MAX_WEIGHT, f"{names[i]} weight: ") for i, w in enumerate(value))


def freeu(value: Any) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != 4:
        raise ValueError(f"freeu: expected None or four numbers (b1, b2, s1, s2), got {value!r}")
    return tuple(number(v, "freeu", 0.0, MAX_WEIGHT) for v in value)


def vae_scale(vae_config: Any) -> int:
    """Image pixels per latent pixel along a side: the VAE's downsampling."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def size_multiple(unet_config: Any, vae_config: Any) -> int:
    """What image sides must be multiples of, from the UNet's and the VAE's configs: the latents (the VAE's
    downsampling) must survive every UNet downsampling."""
    return vae_scale(vae_config) * 2 ** (len(unet_config["block_out_channels"]) - 1)


def image_side(value: Any, name: str, default: int, multiple: int) -> int:
    if value is None:
        return default
    side = integer(value, name, multiple, MAX_SIDE)
    if side % multiple:
        raise ValueError(f"{name}: {side} is not a multiple of {multiple} (the latents must survive every downsampling)")
    return side


def callback(value: Any) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"callback: expected a callable or None, got {type(value).__name__}")


# ------------------------------------------------------------------ loading arguments
def device(value: Any) -> torch.device | None:
    """``None`` or a device PyTorch knows and this machine has (``cuda:N`` within the GPUs present)."""
    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise ValueError(f"device: expected a string or torch.device, got {value!r} ({type(value).__name__})")
    try:
        result = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"device: {str(value)!r} is not a device PyTorch knows (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if result.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device: {str(value)!r} asked for, but no CUDA device is available here; use 'cpu'")
        if result.index is not None and result.index >= count:
            raise ValueError(f"device: {str(value)!r} asked for, but this machine has {count} CUDA device(s)")
    elif result.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {str(value)!r} asked for, but MPS is not available here")
    elif result.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device: {str(value)!r}: lcmla runs on 'cpu', 'cuda' or 'mps'")
    return result


def dtype(value: Any) -> torch.dtype | None:
    if value is not None and value not in DTYPES:
        raise ValueError(f"dtype: expected None or one of {[str(d) for d in DTYPES]}, got {value!r}")
    return value


def loading(name: Any, device_: Any, dtype_: Any, seed: Any, faces: Any, tiny_vae: Any, cuda_graphs: Any, verify: Any) -> None:
    """The arguments of ``Personalizer.from_pretrained``."""
    path(name, "name")
    device(device_)
    dtype(dtype_)
    integer(seed, "seed", 0, MAX_SEED)
    for key, value in (("faces", faces), ("tiny_vae", tiny_vae)):
        if value is not None:
            path(value, key)
    flag(cuda_graphs, "cuda_graphs")
    flag(verify, "verify")


# ------------------------------------------------------------------ memory
def generation_bytes(model: Any, images: int, height: int, width: int, mode: str, use_kv: bool) -> int:
    """Estimated peak activation bytes of a ``generate`` call: the larger of one sampling step (the denoiser's rows,
    or the K/V-encoder's over one reference latent per image) and the VAE decode of every image."""
    groups = 1 if mode == "fast" else 2  # [uncond, cond]
    denoiser_rows = images * groups * (2 if use_kv and mode == "quality" else 1)  # quality with K/V: twice more
    encoder_rows = images * groups if use_kv else 0
    latent = (height // model.vae_scale) * (width // model.vae_scale)
    face = (model.face_size // model.vae_scale) ** 2
    unet = max(denoiser_rows * latent, encoder_rows * face) * _unet_pixel_bytes(model)
    return max(unet, vae_bytes(model, images, height, width))


def vae_bytes(model: Any, images: int, height: int, width: int) -> int:
    """Estimated peak activation bytes of the VAE on ``images`` images of ``height`` x ``width`` pixels, with the
    attention scores of its decode's chunks (:class:`~lcmla_sdk.attention.WideHeadAttnProcessor`)."""
    from .attention import WideHeadAttnProcessor  # here: this module stays importable without diffusers

    channels, itemsize = model.vae.config.block_out_channels, model.vae.dtype.itemsize
    per_pixel = VAE_ACTIVATIONS * channels[min(1, len(channels) - 1)] * itemsize
    scale = vae_scale(model.vae.config)
    tokens = (height // scale) * (width // scale)
    return (images + 1) * height * width * per_pixel + WideHeadAttnProcessor.peak_bytes(images, tokens, itemsize)


def _unet_pixel_bytes(model: Any) -> int:
    return UNET_ACTIVATIONS * model.unet.config.block_out_channels[0] * model.dtype.itemsize


def memory_budget(device: torch.device) -> int | None:
    """Bytes a call may use on ``device``: ``LCMLA_MEMORY_BUDGET_GIB``, else what is free; ``None`` if unknown."""
    setting = os.environ.get("LCMLA_MEMORY_BUDGET_GIB")
    if setting:
        try:
            return int(float(setting) * 2**30)
        except ValueError:
            raise ValueError(f"LCMLA_MEMORY_BUDGET_GIB: expected a number of GiB, got {setting!r}") from None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                fields = dict(line.split(":", 1) for line in handle)
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def check_memory(needed: int, device: torch.device, what: str, advice: str) -> None:
    budget = memory_budget(device)
    if budget is not None and needed > budget:
        raise ValueError(
            f"{what}: needs about {needed / 2**30:.1f} GiB of activations, more than the {budget / 2**30:.1f} GiB "
            f"available on {device}; {advice} (LCMLA_MEMORY_BUDGET_GIB sets the budget)"
        )


# ------------------------------------------------------------------ identities
def identity(model: Any, value: Any) -> None:
    """An :class:`~lcmla_sdk.Identity` given to ``generate``: made by this model, with finite tensors of this model's
    shapes (an edited file, or one built by hand, can keep the fingerprint while its tensors change)."""
    value.check_model(model.fingerprint)
    problem = value.tensor_problem()
    if problem is not None:
        raise ValueError(f"face: the identity's {problem}")
    tokens, width = model.components.resampler.latents.shape[1], model.unet.config.cross_attention_dim
    side = model.face_size // model.vae_scale
    latent = (value.num_references, model.unet.config.in_channels, side, side)
    for name, shape in (("cond_tokens", (1, tokens, width)), ("latent_mean", latent)):
        found = tuple(getattr(value, name).shape)
        if found != shape:
            raise IdentityMismatchError(f"face: the identity's {name} has shape {found}; this model needs {shape}")
