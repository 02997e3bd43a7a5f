"""The lookahead objective: a one-step LCM preview, and identity (and optional perceptual) losses on it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import LCMScheduler
from torch import nn

from .config import ConfigError
from .faces import align_faces

PerceptualLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lcm_preview(
    scheduler: LCMScheduler, eps: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """One LCM step to t=0 from an epsilon prediction: ``c_out * x0 + c_skip * x_t`` (the consistency boundary
    condition; diffusers' LCMScheduler gives c_skip/c_out with sigma_data 0.5 and its ``timestep_scaling``)."""
    alphas = scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timesteps.to(noisy.device, torch.float32))
    x0 = (noisy.float() - (1 - alphas).sqrt() * eps.float()) / alphas.sqrt()
    return c_out.view(-1, 1, 1, 1) * x0 + c_skip.view(-1, 1, 1, 1) * noisy.float()


class IdentityLoss(nn.Module):
    """``1 - cos(ArcFace(aligned preview), ArcFace(aligned reference))`` per sample.

    Both images are warped to the 112x112 ArcFace crop by the similarity from their own landmarks; the warp and the
    network are differentiable in the preview. The reference side carries no gradient.
    """

    def __init__(self, arcface: nn.Module) -> None:
        super().__init__()
        self.arcface = arcface

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        dtype = next(self.arcface.parameters()).dtype
        return self.arcface(align_faces(images.to(dtype), landmarks.to(images.device)))

    def forward(
        self,
        preview: torch.Tensor,
        preview_landmarks: torch.Tensor,
        reference: torch.Tensor,
        reference_landmarks: torch.Tensor,
    ) -> torch.Tensor:
        with torch.no_grad():
            target = self.embed(reference, reference_landmarks)
        return 1.0 - F.cosine_similarity(self.embed(preview, preview_landmarks).float(), target.float(), dim=1)


def load_perceptual(spec: str, kwargs: dict[str, Any], device: torch.device) -> PerceptualLoss:
    """Build the pluggable perceptual loss from ``"package.module:factory"``.

    The factory's result is called as ``loss(preview, reference)`` on ``(B, 3, H, W)`` images in [-1, 1] and must
    return one value per sample (e.g. a wrapper around LPIPS or DreamSim with locally stored weights).
    """
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"lookahead.perceptual: cannot load {spec!r}: {error}") from None
    loss = factory(**kwargs)
    if isinstance(loss, nn.Module):
        loss = loss.to(device).eval().requires_grad_(False)
    return loss
