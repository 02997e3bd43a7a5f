"""The inputs every way of ``lcmla bench`` starts from, and where the time goes: each network alone in a CUDA graph,
the share of a call in each part, and what the per-identity K/V cache costs and changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .bench_timing import graph_ms, measure
from .images import clip_pixels, sample_face, vae_pixels
from .kv_cache import ahead_pays
from .networks import Denoiser, KVEncoder
from .sampling import StepSpec, join_references
from .text import time_ids

if TYPE_CHECKING:
    from .pipeline import Personalizer

PROMPT = "An oil painting of a face"


class Inputs:
    """The conditioning every way starts from: prompt embeddings, the identity, the photo's CLIP features."""

    def __init__(self, model: Personalizer, size: int) -> None:
        self.face = sample_face()
        self.identity = model.encode_face(self.face)
        (self.text, self.pooled), (self.neg_text, self.neg_pooled) = model.encode_prompt([PROMPT], None)
        self.enc_text, self.enc_pooled = model.prompt_encoder.encoder_prompt()
        pixels = clip_pixels(self.face, model.clip_size).to(model.device, model.dtype)
        both = torch.cat([torch.zeros_like(pixels), pixels])
        self.clip_hidden = model.adapter.image_encoder(both, output_hidden_states=True).hidden_states[-2]
        self.face_pixels = vae_pixels(self.face, model.face_size).to(model.device, model.vae.dtype)
        self.size, self.prompt = size, PROMPT


def step_shares(model: Personalizer, x: Inputs, mode: str, steps: int, call_ms: float) -> dict[str, float]:
    """Share of a graph-mode call (batch 1, ``call_ms`` end to end) in the K/V-encoder (in every step, or in one pass
    ahead of the loop), the denoiser, guidance + scheduler, decode, and the rest (host work: text encoders, noise,
    copies): each network captured alone at the call's shapes, the step as the sampling loop captured it, the decode
    eagerly."""
    device, dtype = model.device, model.dtype
    spec = StepSpec(mode, 1, x.identity.num_references, model.has_kv_encoder)  # the call just measured
    ahead = ahead_pays(spec, model.step_tables(mode, steps), model.kv_ahead_rows)
    buffers = model.step_graphs.last().inputs
    step_ms = measure(device, model.step_graphs.last().replay, 10)[1]
    rows = spec.encoder_rows * (steps if ahead else 1)
    side = model.face_size // model.vae_scale
    encoder_args = (
        torch.randn(rows, 4, side, side, device=device, dtype=dtype), torch.full((rows,), 500.0, device=device),
        x.enc_text.expand(rows, -1, -1).contiguous(), x.enc_pooled.expand(rows, -1).contiguous(),
        time_ids(x.size, x.size, rows, dtype, device).contiguous(),
    )  # fmt: skip
    kv_ms = graph_ms(device, lambda: model.kv_encoder(*encoder_args))
    kv = join_references([k[: spec.encoder_rows] for k in model.kv_encoder(*encoder_args)], spec.kv_rows)
    latents = buffers["latents"].repeat(len(spec.denoiser_blocks), 1, 1, 1)
    network = model.lcm_denoiser if mode == "fast" else model.denoiser
    rest = [buffers[n] for n in ("text", "pooled", "time_ids", "image_tokens", "adapter_scale")]
    timestep = buffers["timestep"].expand(latents.shape[0])
    denoise_ms = graph_ms(device, lambda: network(latents, timestep, *rest, kv, buffers.get("freeu")))
    decode_ms = measure(device, lambda: model.decode(buffers["latents"], "pt"), 3)[1]
    kv_total, kv_in_step = (kv_ms, 0.0) if ahead else (steps * kv_ms, kv_ms)
    return {
        "kv_encoder": kv_total / call_ms, "denoiser": steps * denoise_ms / call_ms,
        "guidance_scheduler": steps * max(0.0, step_ms - kv_in_step - denoise_ms) / call_ms,
        "decode": decode_ms / call_ms,
        "rest": max(0.0, call_ms - steps * step_ms - (kv_total - steps * kv_in_step) - decode_ms) / call_ms,
        "step_ms": step_ms, "kv_encoder_ms": kv_ms, "kv_ahead_rows": rows if ahead else 0, "denoiser_ms": denoise_ms,
        "decode_ms": decode_ms,
    }  # fmt: skip


def network_rows(model: Personalizer, x: Inputs) -> dict[str, float]:
    """Each UNet network alone in a CUDA graph at batch 1: merged adapters against no adapter and peft unmerged."""
    from .lora import KV_ENCODER_ADAPTER, LCM_ADAPTER, activate_adapters, materialize

    device, dtype = model.device, model.dtype
    side = x.size // model.vae_scale
    face_side = model.face_size // model.vae_scale
    latent = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    face = torch.randn(1, 4, face_side, face_side, device=device, dtype=dtype)
    t = torch.full((1,), 500.0, device=device)
    ids = time_ids(x.size, x.size, 1, dtype, device)
    tokens, scale = x.identity.cond_tokens.to(device, dtype), torch.ones(1, device=device)
    cond = (x.text, x.pooled, ids)
    plain_encoder = KVEncoder(materialize(model.unet, ()), len(model.kv_blocks))
    kv = model.kv_encoder(face, t, x.enc_text, x.enc_pooled, ids)
    rows = {
        "denoiser (no adapter)": graph_ms(device, lambda: model.denoiser(latent, t, *cond, tokens, scale, kv)),
        "LCM denoiser, LoRA merged": graph_ms(device, lambda: model.lcm_denoiser(latent, t, *cond, tokens, scale, kv)),
        "K/V-encoder without LoRA": graph_ms(device, lambda: plain_encoder(face, t, x.enc_text, x.enc_pooled, ids)),
        "K/V-encoder, LoRA merged": graph_ms(device, lambda: model.kv_encoder(face, t, x.enc_text, x.enc_pooled, ids)),
    }
    peft_denoiser = Denoiser(model.unet)
    try:
        activate_adapters(model.unet, (LCM_ADAPTER,))
        rows["LCM denoiser, peft unmerged"] = graph_ms(device, lambda: peft_denoiser(latent, t, *cond, tokens, scale, kv))
        activate_adapters(model.unet, (KV_ENCODER_ADAPTER,))
        peft_encoder = KVEncoder(model.unet, len(model.kv_blocks))
        rows["K/V-encoder, peft unmerged"] = graph_ms(device, lambda: peft_encoder(face, t, x.enc_text, x.enc_pooled, ids))
    finally:
        activate_adapters(model.unet, ())
    big = torch.randn(1, 4, side, side, device=device)
    vae = model.vae
    rows["VAE decode fp16 (diffusers' layers)"] = measure(device, lambda: vae.decode(big.to(vae.dtype)).sample, 3)[1]
    rows["VAE decode fp16 (the library's decode network)"] = measure(
        device, lambda: model.decoder.network(big.to(vae.dtype)), 3)[1]  # fmt: skip
    rows["VAE decode fp32"] = measure(device, lambda: vae.float().decode(big).sample, 3)[1]
    vae.to(dtype)
    if model.decoder.tiny_vae is not None:
        rows["tiny VAE decode fp16"] = measure(device, lambda: model.decoder.tiny_vae.decode(big.to(dtype)).sample, 3)[1]
    return rows


def kv_cache_effect(model: Personalizer, x: Inputs, steps: int, seeds: int = 4) -> dict[str, float]:
    """Memory of one identity's cached K/V, and how far cached images move from the authors' noise pairing: mean
    absolute difference of 8-bit pixels over the same seeds (random weights: a measure of the mechanism, not of the
    faces a trained model would give)."""
    kwargs = {"seed": list(range(seeds)), "num_images": seeds, "mode": "fast", "steps": steps, "output": "pt"}
    kwargs.update(height=x.size, width=x.size)
    cached = model.generate(x.identity, x.prompt, kv_cache=True, **kwargs)
    paired = model.generate(x.identity, x.prompt, **kwargs)
    entry = model.identity_kv_cache.values()[-1][0]
    return {
        "gib_per_identity": entry.numel() * entry.element_size() / 2**30,
        "mean_abs_pixel_difference": ((cached - paired).abs().mean() * 255).item(),
        "mean_abs_pixel_difference_other_seeds": ((paired - paired.roll(1, 0)).abs().mean() * 255).item(),
    }
