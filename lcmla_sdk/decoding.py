"""Latents to images: the full VAE (optionally compiled, with Inductor's artefacts kept in a file) or the tiny one."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.models.attention_processor import Attention

from .attention import WideHeadAttnProcessor
from .compiling import AheadOfTime, CompiledNetwork, VaeDecode, load_caches, saved_caches
from .errors import ModelFilesError
from .images import to_pil, to_uint8, to_unit
from .lora import materialize
from .upsampling import install_phase_upsampling

VAES = ("full", "tiny")
OUTPUTS = ("pil", "np", "pt", "latent")


def load_tiny_vae(folder: str | Path) -> AutoencoderTiny:
    """A local diffusers ``AutoencoderTiny`` folder (TAESD-XL); :class:`ModelFilesError` if it is not one."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ModelFilesError(f"tiny_vae: {path} is not a diffusers AutoencoderTiny folder (no config.json)")
    return AutoencoderTiny.from_pretrained(str(path), local_files_only=True)


def decode_network(vae: AutoencoderKL) -> VaeDecode:
    """The full VAE's decode as the library runs it, eager or compiled: on a copy of the VAE's modules (weights shared,
    ``vae.decode`` itself untouched), its upsamplers compute by phases (:mod:`lcmla_sdk.upsampling`) and its attention
    by :class:`~lcmla_sdk.attention.WideHeadAttnProcessor`. The same images up to rounding. The copy is made now:
    modules or processors set on ``vae`` later are not seen (its weights are, changed in place)."""
    own = materialize(vae, ())
    install_phase_upsampling(own.decoder)
    for module in own.decoder.modules():
        if isinstance(module, Attention):
            module.set_processor(WideHeadAttnProcessor())
    return VaeDecode(own)


class Decoder:
    """``vae`` (scaled latents divided by its scaling factor) or ``tiny_vae`` (TAESD decodes the scaled latents)."""

    def __init__(self, vae: AutoencoderKL, tiny_vae: AutoencoderTiny | None) -> None:
        self.vae, self.tiny_vae = vae, tiny_vae
        self.network = decode_network(vae)
        self.compiled = False  # the full VAE's decode runs compiled (compile() turns it on; off: eager again)
        self._compiled_decode: CompiledNetwork | None = None

    def __call__(self, latents: torch.Tensor, output: str, which: str = "full"):
        """``"pt"``: float in [0, 1] on the latents' device; ``"np"``: uint8 arrays; ``"pil"``; ``"latent"``: as is."""
        if output == "latent":
            return latents
        if which == "tiny":
            images = self.tiny_vae.decode(latents.to(self.tiny_vae.dtype)).sample
        else:
            images = self._full_decode()(self.scaled(latents))
        if output == "pt":
            return to_unit(images)
        return list(to_uint8(images)) if output == "np" else to_pil(images)

    def scaled(self, latents: torch.Tensor) -> torch.Tensor:
        """What the full VAE decodes: the scaled latents divided by its scaling factor, in its dtype."""
        return latents.to(self.vae.dtype) / self.vae.config.scaling_factor

    def _full_decode(self):
        if self.vae.use_tiling or self.vae.use_slicing:  # asked for on the VAE (vae.enable_tiling()): its own way
            return lambda scaled: self.vae.decode(scaled).sample
        return self._compiled_decode if self.compiled and self._compiled_decode is not None else self.network

    def compile(self, latent_side: int, cache: str | Path | None = None, warm: bool = True,
                ahead: AheadOfTime | None = None) -> float:  # fmt: skip
        """Compile the full VAE's decode with ``torch.compile`` (Inductor fuses its normalisations and activations,
        the bulk of its time at 1024^2), run it once at ``latent_side``, and return the seconds that took.

        ``cache``: a file for Inductor's artefacts (``torch.compiler.load_cache_artifacts`` before compiling,
        ``save_cache_artifacts`` after), so the next process on this machine compiles from it in a fraction of the
        time. The batch dimension is compiled dynamic; a batch of one is compiled on its own (PyTorch specialises
        sizes 0 and 1), so both are compiled here; ``warm=False`` leaves each to its first call. ``ahead``: decodes
        compiled ahead of time, used at the shapes they were built for (:mod:`lcmla_sdk.engines.compiled`).
        """
        path = Path(cache).expanduser() if cache is not None else None
        if path is not None and path.is_file():
            load_caches(path.read_bytes())
        decode = CompiledNetwork(self.network, "decode", ahead)
        begin = time.perf_counter()
        with torch.inference_mode():
            for batch in (1, 2) if warm else ():
                decode(torch.zeros(batch, self.vae.config.latent_channels, latent_side, latent_side,
                                   device=self.vae.device, dtype=self.vae.dtype))  # fmt: skip
        seconds = time.perf_counter() - begin
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_bytes(saved_caches())
            temporary.replace(path)
        self._compiled_decode, self.compiled = decode, True
        return seconds
