"""Every random tensor of one generation, drawn from each image's own generator (on the CPU for a seed).

The draws follow the order of the authors' loop: initial noise, the reference latent sample, (the reference's own
noise when its latent's shape differs from the image's), then the scheduler's noise step by step. So a seed gives
the same image eagerly and from a CUDA graph, alone or in a batch. The first three are drawn before the loop; each
step's noise when the loop reaches that step (:class:`StepNoise`), so that the host draws it while the GPU runs the
steps (or the K/V pass) before it: drawn all ahead, they were 8.2 ms of host time at fast batch 1 before the K/V
pass could start (4.4 ms now; an H100 machine's host).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from .identity import Identity
from .transfer import to_device

FACE_NOISES = ("paired", "fixed")
# Seed of the reference noise when it is fixed per identity (face_noise="fixed", and the per-identity K/V cache).
FIXED_FACE_NOISE_SEED = 0
MAX_DRAW_THREADS = 8


@dataclass
class Noise:
    latents: torch.Tensor  # (B, 4, h, w): the initial latents
    face_latents: torch.Tensor  # (B x R, 4, fh, fw): each image's sample of its reference latents, scaled
    face_noise: torch.Tensor  # (B x R, 4, fh, fw): what noises them at every step
    steps: StepNoise | None  # the scheduler's injected noise (LCM), one step at a time


def _draw_each(generators: list[torch.Generator], shapes: list[tuple[int, ...]],
               dtype: torch.dtype | None = None) -> list[list[torch.Tensor]]:  # fmt: skip
    """For each of ``shapes``, one draw per image from its generator (``[shape][image]``, each on its generator's
    device), in the order a loop over shapes, then images would draw them: a generator shared by several images is
    drawn from in turn. Distinct CPU generators draw on threads of their own, side by side where the host has the
    cores (they are independent, and a draw releases the GIL); GPU generators draw on the calling thread, on its
    stream."""
    images_of: dict[int, list[int]] = {}
    for image, g in enumerate(generators):
        images_of.setdefault(id(g), []).append(image)
    groups = list(images_of.values())

    def draw_group(images: list[int]) -> list[list[torch.Tensor]]:
        g = generators[images[0]]
        return [[torch.randn(shape, generator=g, device=g.device, dtype=dtype) for _ in images] for shape in shapes]

    if len(groups) == 1 or any(g.device.type != "cpu" for g in generators):
        drawn = [draw_group(images) for images in groups]
    else:
        with ThreadPoolExecutor(min(len(groups), MAX_DRAW_THREADS), thread_name_prefix="lcmla-noise") as pool:
            drawn = list(pool.map(draw_group, groups))
    per_shape: list[list[torch.Tensor]] = [[None] * len(generators) for _ in shapes]  # type: ignore[list-item]
    for images, draws in zip(groups, drawn):
        for shape_draws, row in zip(draws, per_shape):
            for image, x in zip(images, shape_draws):
                row[image] = x
    return per_shape


@dataclass
class StepNoise:
    """The scheduler's noise of the first ``count`` steps, ``(B, 4, h, w)`` each, drawn in ``dtype`` (as diffusers'
    schedulers draw it) from each image's generator when asked for, step after step."""

    generators: list[torch.Generator]  # one per image, in row order
    shape: tuple[int, ...]  # one image's (1, 4, h, w)
    count: int
    dtype: torch.dtype
    device: torch.device
    drawn: int = 0

    def __call__(self, index: int) -> torch.Tensor:
        """Step ``index``'s noise on the device; steps are drawn in order, each once (the generators move on)."""
        if index != self.drawn or index >= self.count:
            raise IndexError(f"step noise: step {index} asked for after {self.drawn} of {self.count} steps were drawn")
        self.drawn += 1
        # Each draw where its generator is: one on the GPU is not waited for (the loop runs on meanwhile).
        return torch.cat([to_device(x, self.device) for x in _draw_each(self.generators, [self.shape], self.dtype)[0]])


def join(parts: list[Noise]) -> Noise:
    """The draws of consecutive groups of images as one, in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0].steps
    steps = None if first is None else replace(first, generators=[g for p in parts for g in p.steps.generators])
    joined = (torch.cat([getattr(p, name) for p in parts]) for name in ("latents", "face_latents", "face_noise"))
    return Noise(*joined, steps)


def fixed_face_noise(face: Identity) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity's own reference-latent sample noise and noising noise (``face_noise="fixed"``)."""
    generator = torch.Generator("cpu").manual_seed(FIXED_FACE_NOISE_SEED)
    return torch.randn(face.latent_mean.shape, generator=generator), torch.randn(face.latent_mean.shape, generator=generator)


def face_latents(face: Identity, eps: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Scaled samples of the reference latents, on the identity's device; ``eps`` (on the CPU) has ``images x
    references`` rows (image-major)."""
    repeat = eps.shape[0] // face.num_references
    mean, std = (x.float().repeat(repeat, 1, 1, 1) for x in (face.latent_mean, face.latent_std))
    return (mean + std * to_device(eps, mean.device)) * scaling_factor


def draw(
    seeds: list[int | torch.Generator], latent_shape: tuple[int, ...], face: Identity, noise_steps: int,
    face_noise: str, scaling_factor: float, dtype: torch.dtype, device: torch.device,
) -> Noise:  # fmt: skip
    """:class:`Noise` for one image per seed; ``latent_shape`` is one image's ``(1, 4, h, w)``. A seed is a CPU
    generator's seed, or a ``torch.Generator`` drawn from as it stands (on its own device; one generator given for
    several images is drawn from in turn). The scheduler's noise is drawn later, step by step (:class:`StepNoise`)."""
    generators = [s if isinstance(s, torch.Generator) else torch.Generator("cpu").manual_seed(s) for s in seeds]
    face_shape = tuple(face.latent_mean.shape)
    # The authors noise the reference with the generation's initial noise; one of another size has its own.
    own_reference = face_shape[1:] != tuple(latent_shape[1:])
    shapes = [latent_shape, face_shape] + [face_shape] * own_reference
    drawn = [torch.cat([x.cpu() for x in draws]) for draws in _draw_each(generators, shapes)]
    noise, eps = drawn[:2]
    reference_noise = drawn[2] if own_reference else noise.repeat_interleave(face.num_references, 0)
    steps = StepNoise(generators, latent_shape, noise_steps, dtype, device) if noise_steps else None
    if face_noise == "fixed":
        fixed_eps, fixed_noise = fixed_face_noise(face)
        eps, reference_noise = (x.repeat(len(generators), 1, 1, 1) for x in (fixed_eps, fixed_noise))
    return Noise(
        to_device(noise, device, dtype), to_device(face_latents(face, eps, scaling_factor), device, dtype),
        to_device(reference_noise, device, dtype), steps,
    )


def draw_per_prompt(
    seeds: list[int | torch.Generator], identities: Sequence[Identity], latent_shape: tuple[int, ...], noise_steps: int,
    face_noise: str, scaling_factor: float, dtype: torch.dtype, device: torch.device,
) -> Noise:  # fmt: skip
    """:func:`draw` for each prompt's images (``seeds`` prompt-major) with that prompt's identity, joined; in one draw
    when every prompt has the same identity (the same values: each image draws from its own generator)."""
    if all(identity is identities[0] for identity in identities):
        groups = [(seeds, identities[0])]
    else:
        images = len(seeds) // len(identities)
        groups = [(seeds[p * images : (p + 1) * images], identity) for p, identity in enumerate(identities)]
    return join([draw(group, latent_shape, identity, noise_steps, face_noise, scaling_factor, dtype, device)
                 for group, identity in groups])  # fmt: skip
