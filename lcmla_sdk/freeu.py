"""FreeU on the denoiser, as the authors' inference applies it, with its strengths as a runtime input.

The authors' README enables FreeU (b1 1.0, b2 1.1, s1 0.9, s2 0.2) on their decoder, but their resolution check treats
index 0 as false, so only the second up-stage (``up_blocks.1``, FreeU's resolution index 1) changes: at each of its
layers, the first half of the backbone channels is multiplied by ``b2`` and the skip features go through FreeU's
Fourier filter with ``s2`` (the frequencies at the centre of the shifted spectrum, threshold 1, scaled by ``s2``). The
(b1, s1) pair never acts there, and does not here.

The filter is written as two real matrix products instead of an FFT: with ``Q = F^-1 diag(e) F`` the projection on
the scaled frequencies (0 and -1 along each axis, the centre 2 x 2 of the shifted spectrum),
``filter(x) = x + (s - 1) Re(Q_h x Q_w^T)``. Same numbers (up to rounding), and the graph exports to ONNX and is
captured in a CUDA graph without an FFT plan.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D

from .defaults import AUTHORS_FREEU  # noqa: F401  (the authors' README values: b1, b2, s1, s2)
from .transfer import device_tensor

# FreeU's resolution index of the stage the authors' code changes (up_blocks.1 in SDXL).
STAGE = 1


@lru_cache(maxsize=32)
def _projection(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of ``Q[a, b] = (1/N) sum over f in {0, -1} of exp(2 pi i f (a - b) / N)``."""
    index = torch.arange(size, dtype=torch.float64)
    angle = 2 * math.pi * -1.0 * (index[:, None] - index[None, :]) / size  # the f = -1 term; f = 0 adds 1
    real, imaginary = (1.0 + torch.cos(angle)) / size, torch.sin(angle) / size
    return real.float().to(device), imaginary.float().to(device)


def fourier_filter(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FreeU's ``fourier_filter(x, threshold=1, scale)`` on ``(..., H, W)``, in fp32, back in ``x``'s dtype."""
    real_h, imag_h = _projection(x.shape[-2], x.device)
    real_w, imag_w = _projection(x.shape[-1], x.device)
    values = x.float()
    low = real_h @ values @ real_w.T - imag_h @ values @ imag_w.T
    return (values + (scale - 1.0) * low).to(x.dtype)


def scale_stage(hidden: torch.Tensor, skip: torch.Tensor, freeu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``freeu = (b, s)``: the first half of ``hidden``'s channels times ``b``; ``skip`` Fourier-filtered with ``s``."""
    half = hidden.shape[1] // 2
    hidden = torch.cat([hidden[:, :half] * freeu[0].to(hidden.dtype), hidden[:, half:]], dim=1)
    return hidden, fourier_filter(skip, freeu[1])


class FreeUCrossAttnUpBlock2D(CrossAttnUpBlock2D):
    """diffusers' block, plus FreeU when the call's ``cross_attention_kwargs`` carry ``freeu`` = (b, s)."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                cross_attention_kwargs=None, upsample_size=None, attention_mask=None, encoder_attention_mask=None):  # fmt: skip
        freeu = (cross_attention_kwargs or {}).get("freeu")
        if freeu is None:
            return super().forward(hidden_states, res_hidden_states_tuple, temb, encoder_hidden_states,
                                   cross_attention_kwargs, upsample_size, attention_mask, encoder_attention_mask)  # fmt: skip
        for resnet, attn in zip(self.resnets, self.attentions):
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states, skip = scale_stage(hidden_states, skip, freeu)
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)
            hidden_states = attn(
                hidden_states, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask, return_dict=False,
            )[0]  # fmt: skip
        for upsampler in self.upsamplers or ():
            hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


def install_freeu(unet: torch.nn.Module) -> None:
    """Let ``unet``'s FreeU stage take ``freeu`` at call time. For a denoiser's own plain copy of the UNet
    (:func:`lcmla_sdk.lora.materialize`) only: the K/V-encoder's stage stays as it is, as in the authors' code."""
    for block in unet.up_blocks:
        if isinstance(block, CrossAttnUpBlock2D) and block.resolution_idx == STAGE:
            block.__class__ = FreeUCrossAttnUpBlock2D


def stage_values(freeu: tuple[float, float, float, float], device: torch.device) -> torch.Tensor:
    """The ``(b, s)`` tensor of the stage the authors' code changes, from the README's (b1, b2, s1, s2)."""
    return device_tensor([freeu[1], freeu[3]], device, torch.float32)
