"""Nearest 2x upsampling then a 3x3 convolution, computed without upsampling.

After a nearest 2x upsampling, the 3x3 window of every output pixel covers only 2x2 distinct input pixels, so each
of the four output phases (row and column parity) is a 2x2 convolution of the input itself, with the 3x3 kernel's
taps summed onto those pixels. The four phase kernels run as one convolution with four times the output channels,
whose output is interleaved into the full-size result: 16 multiply-adds per input pixel and output channel instead
of 36 (the VAE decoder's three upsamplers are 28% of its work at 1024^2), and no upsampled copy of the input. The
phases take as much memory as the convolution's output did; compiled, Inductor reads them straight into the next
layer. Same numbers in real arithmetic; the summed taps are rounded once, from fp32, to the weights' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from torch import nn


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in, 3, 3)`` -> ``(4 * out, in, 2, 2)``: the kernels of the phases (0, 0), (0, 1), (1, 0), (1, 1)."""
    w = weight.float()

    def fold(taps: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        first, middle, last = taps.unbind(dim)
        # even outputs read the pixels before and at theirs; odd ones the pixels at and after theirs
        return torch.stack([first, middle + last], dim), torch.stack([first + middle, last], dim)

    return torch.cat([column for row in fold(w, 2) for column in fold(row, 3)]).to(weight.dtype)


def phase_views(x: torch.Tensor, conv: nn.Conv2d) -> list[list[torch.Tensor]]:
    """``views[a][b]``: the output pixels ``(2i + a, 2j + b)`` of ``conv(interpolate(x, scale_factor=2))``, each
    ``(N, C, H, W)``, views of one convolution's output."""
    channels, (height, width) = conv.out_channels, x.shape[-2:]
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    # output row p of a 2x2 kernel with padding 1 reads input rows p - 1 and p
    phases = F.conv2d(x, phase_kernels(conv.weight), bias, padding=1).unflatten(1, (2, 2, channels))
    return [[phases[:, a, b, :, a : a + height, b : b + width] for b in (0, 1)] for a in (0, 1)]


def interleave_stacked(views: list[list[torch.Tensor]]) -> torch.Tensor:
    """The full-size output of :func:`phase_views` as one stack (what Inductor fuses into the next layer's reads)."""
    batch, channels, height, width = views[0][0].shape
    return torch.stack([torch.stack(row, -1) for row in views], -3).reshape(batch, channels, 2 * height, 2 * width)


def interleave_into(views: list[list[torch.Tensor]], layout: torch.memory_format) -> torch.Tensor:
    """The full-size output of :func:`phase_views`, each phase written into place (no stacked copy beside them)."""
    first = views[0][0]
    batch, channels, height, width = first.shape
    out = torch.empty(batch, channels, 2 * height, 2 * width, dtype=first.dtype, device=first.device,
                      memory_format=layout)  # fmt: skip
    grid = out.view(batch, channels, height, 2, width, 2)
    for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)):
        grid[:, :, :, a, :, b] = views[a][b]
    return out


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, padding-1, stride-1 ``conv``."""
    views = phase_views(x, conv)
    if torch.compiler.is_compiling():  # the form measured compiled
        return interleave_stacked(views)
    # eager: the layout the layers after ran fastest in (benchmarks/eager_upsample_probe.py): on an H100 contiguous
    # (the decode 85.6 ms at 1024^2, 114.2 in the channels-last strides the VAE's attention leaves, which diffusers
    # keeps: 90.2); elsewhere (the CPU: faster there) the input's, as diffusers' upsampling keeps it.
    keep = x.device.type != "cuda" and x.is_contiguous(memory_format=torch.channels_last)
    return interleave_into(views, torch.channels_last if keep else torch.contiguous_format)


def _rewritable(module: nn.Module) -> bool:
    conv = getattr(module, "conv", None)
    return (isinstance(module, Upsample2D) and module.use_conv and module.interpolate and module.norm is None
            and not module.use_conv_transpose and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1) and conv.padding_mode == "zeros" and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)  # fmt: skip


class PhaseUpsample2D(nn.Module):
    """diffusers' ``Upsample2D`` (nearest 2x, then its 3x3 ``conv``) by :func:`upsample_conv`; the same ``conv``
    module, so its weights and state-dict keys are the original's. A requested ``output_size`` other than twice the
    input is left to the original module."""

    def __init__(self, upsample: Upsample2D) -> None:
        super().__init__()
        if not _rewritable(upsample):
            raise ValueError("PhaseUpsample2D: only a nearest 2x upsampling followed by a plain 3x3 convolution")
        self.channels, self.conv = upsample.channels, upsample.conv
        self.__dict__["original"] = upsample  # not a submodule: its conv is registered once, as ``conv``

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        if output_size is not None and tuple(output_size) != tuple(2 * side for side in hidden_states.shape[-2:]):
            return self.original(hidden_states, output_size)
        return upsample_conv(hidden_states, self.conv)


def install_phase_upsampling(module: nn.Module) -> int:
    """Replace each rewritable ``Upsample2D`` inside ``module`` by a :class:`PhaseUpsample2D`; returns how many.
    Only for a module tree of its own (a copy from :func:`lcmla_sdk.lora.materialize`): the modules are swapped in
    their parents."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _rewritable(child):
                parent._modules[name] = PhaseUpsample2D(child)
                swapped += 1
    return swapped
