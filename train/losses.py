"""The lookahead objective: a one-step LCM preview decoded by the tiny VAE, and identity, DreamSim (and optional
perceptual) losses on it."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny, LCMScheduler
from torch import nn

from lcmla_sdk.decoding import load_tiny_vae
from lcmla_sdk.errors import ModelFilesError

from .config import ConfigError
from .faces import align_faces

PerceptualLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DREAMSIM_SIZE = 224  # the side DreamSim's ViTs take
# What ``dreamsim(pretrained=True, cache_dir=FOLDER)`` (dreamsim 0.2, its default "ensemble" model, the authors')
# reads from FOLDER. Its loader downloads whatever is missing, so they are checked first: nothing is ever downloaded.
DREAMSIM_FILES = (
    "ensemble_lora/adapter_config.json",  # the LoRA that DreamSim trained on its three ViTs
    "dino_vitb16_pretrain.pth",  # DINO's projection head
    "clip_vitb16_pretrain.pth.tar",
    "open_clip_vitb16_pretrain.pth.tar",
    "facebookresearch_dino_main/hubconf.py",  # DINO ViT-B/16 comes through torch.hub, with the folder as hub dir
    "checkpoints/dino_vitbase16_pretrain.pth",
)


def lcm_preview(
    scheduler: LCMScheduler, eps: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """One LCM step to t=0 from an epsilon prediction: ``c_out * x0 + c_skip * x_t`` (the consistency boundary
    condition; diffusers' LCMScheduler gives c_skip/c_out with sigma_data 0.5 and its ``timestep_scaling``)."""
    alphas = scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timesteps.to(noisy.device, torch.float32))
    x0 = (noisy.float() - (1 - alphas).sqrt() * eps.float()) / alphas.sqrt()
    return c_out.view(-1, 1, 1, 1) * x0 + c_skip.view(-1, 1, 1, 1) * noisy.float()


class MissingLossWarning(UserWarning):
    """A loss of the authors' training that this run cannot compute (its weights were not given)."""


def preview_decoder(
    folder: str | None, random_args: dict[str, Any] | None, seed: int, device: torch.device, dtype: torch.dtype
) -> AutoencoderTiny:
    """The tiny VAE that decodes the previews, frozen on ``device`` in ``dtype``: a local ``AutoencoderTiny``
    folder, or without one random weights drawn from ``seed`` (``random_args``: the preset's constructor arguments;
    the global random state is left as it was)."""
    if folder is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderTiny(**random_args)
            responsive_decoder_init(vae)
    else:
        try:
            vae = load_tiny_vae(folder)
        except ModelFilesError as error:  # a config mistake, reported as one
            raise ConfigError(str(error)) from None
    return nn.Module.to(vae, device=device, dtype=dtype).eval().requires_grad_(False)


def responsive_decoder_init(vae: AutoencoderTiny) -> None:
    """He-initialise a random tiny VAE's decoder (output layer scaled to images of about unit range).

    With PyTorch's default init the signal shrinks through the decoder's plain convolutions and a random preview
    barely depends on its latent; presets randomise weights so that every path matters, as the core's presets do.
    """
    convs = [m for m in vae.decoder.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    convs[-1].weight.data.mul_(0.05)


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


class DreamSimLoss(nn.Module):
    """The authors' ``DreamSIMLoss``: DreamSim distance between preview and reference, one value per sample.

    Images in [-1, 1] go to [0, 1] and are resized to 224x224 bicubic (antialiased, as torchvision's ``Resize`` on
    tensors), then ``model(a, b)`` gives ``1 - cos`` of DreamSim's embeddings. Gradients reach the preview; the
    model is frozen.
    """

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def dreamsim_input(images: torch.Tensor) -> torch.Tensor:
        unit = (images.float() + 1.0) / 2.0
        size = (DREAMSIM_SIZE, DREAMSIM_SIZE)
        return F.interpolate(unit, size=size, mode="bicubic", align_corners=False, antialias=True)

    def forward(self, preview: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.dreamsim_input(reference)
        return self.model(self.dreamsim_input(preview), target).reshape(-1)


def optional_dreamsim(folder: str | None, weight: float, device: torch.device) -> DreamSimLoss | None:
    """DreamSim from ``folder`` when the loss is on (``weight``); without a folder, a loud
    :class:`MissingLossWarning` and no DreamSim loss."""
    if not weight:
        return None
    if folder is None:
        warnings.warn(
            "\n" + "!" * 100 + "\nlookahead.dreamsim_weight is "
            f"{weight:g} (the authors' DreamSim loss) but no DreamSim folder is given "
            "(lookahead.dreamsim): training WITHOUT it, unlike the authors. Give the folder, or set "
            "lookahead.dreamsim_weight=0 to train without it on purpose.\n" + "!" * 100,
            MissingLossWarning, stacklevel=3,
        )  # fmt: skip
        return None
    return load_dreamsim(folder, device)


def load_dreamsim(folder: str | Path, device: torch.device) -> DreamSimLoss:
    """DreamSim from a local folder (``lookahead.dreamsim``), through the ``dreamsim`` package's own loader.

    The folder is what ``dreamsim(pretrained=True, cache_dir=FOLDER)`` leaves after one run with network access:
    its checkpoints and torch.hub's copy of DINO. Missing files or a missing package are a :class:`ConfigError`.
    """
    folder = Path(folder).expanduser()
    missing = [name for name in DREAMSIM_FILES if not (folder / name).exists()]
    if missing:
        raise ConfigError(
            f"lookahead.dreamsim: {folder} lacks {missing}; fill it once where there is network with "
            "`dreamsim(pretrained=True, cache_dir=FOLDER)` from the dreamsim package"
        )
    try:
        from dreamsim import dreamsim
    except ImportError as error:
        raise ConfigError(
            f"lookahead.dreamsim: the dreamsim package cannot be imported ({error}); install lcmla[dreamsim] with a "
            "torchvision built for your torch"
        ) from None
    hub_dir = torch.hub.get_dir()
    try:  # dreamsim points torch.hub at the folder (DINO is cached there); put it back afterwards
        model, _ = dreamsim(pretrained=True, device=str(device), cache_dir=str(folder))
    finally:
        torch.hub.set_dir(hub_dir)
    return DreamSimLoss(model.eval().requires_grad_(False))


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
