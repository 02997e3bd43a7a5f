"""What one training step computes (``official_method_facts.md`` sections 7-11): the batch's latents and prompt
embeddings, the diffusion loss, and the lookahead loss on a one-step LCM preview.

:class:`StepLosses` is a part of :class:`~lcmla_sdk.train.trainer.Trainer`, which builds what these methods read:
``config``, ``device``, ``rank``, ``weight_dtype``, ``accelerator``, ``model``, ``networks``, ``lora``, ``ddpm``,
``lcm_scheduler``, ``tiny_vae``, ``landmarks``, ``identity_loss``, ``dreamsim``, ``perceptual`` and the prompt cache
``_text_cache``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lcmla_sdk.images import to_uint8
from lcmla_sdk.lora import LCM_ADAPTER
from lcmla_sdk.text import time_ids

from .draws import drop_image_tokens, drop_kv_tokens, generator_for, lcm_lora_scale, sample_timesteps
from .losses import lcm_preview


class StepLosses:
    """The losses of one step, computed from the trainer's networks (no optimiser step here)."""

    @torch.no_grad()
    def prepare_inputs(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Latents and prompt embeddings of a batch; nothing here is trained."""
        generator = generator_for(self.config.seed, step, self.rank, "latents")
        size = self.config.data.resolution
        batch_size = batch["target_pixels"].shape[0]
        text, pooled = self._encode_text(batch["target_prompt"])
        ref_text, ref_pooled = self._encode_text(batch["reference_prompt"])
        return {
            "target": self._encode_latents(batch["target_pixels"], generator),
            "reference": self._encode_latents(batch["reference_pixels"], generator),
            "text": text, "pooled": pooled, "ref_text": ref_text, "ref_pooled": ref_pooled,
            "time_ids": time_ids(size, size, batch_size, self.weight_dtype, self.device),
            "clip": batch["reference_clip"].to(self.device),
            "reference_pixels": batch["reference_pixels"].to(self.device),
            "reference_landmarks": batch["reference_landmarks"].to(self.device),
        }  # fmt: skip

    def _encode_latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.model.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return dist.sample(generator=generator).float() * vae.config.scaling_factor

    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            if len(self._text_cache) > 4096:  # prompts repeat across a data set; bound the cache anyway
                self._text_cache.clear()
            (text, pooled), _ = self.model.encode_prompt(missing, None)
            self._text_cache.update({p: (text[i], pooled[i]) for i, p in enumerate(missing)})
        return tuple(torch.stack([self._text_cache[p][part] for p in prompts]) for part in (0, 1))

    def _noised(self, inputs: dict, count: int, num_timesteps: int, alpha: float, generator: torch.Generator):
        """Timesteps, noise, and target and reference noised with the same noise at the same t (the authors'
        ``noisy_encoder_input``)."""
        timesteps = sample_timesteps(count, num_timesteps, alpha, generator).to(self.device)
        noise = torch.randn(inputs["target"][:count].shape, generator=generator).to(self.device)
        target = self.ddpm.add_noise(inputs["target"][:count], noise, timesteps)
        reference = self.ddpm.add_noise(inputs["reference"][:count], noise, timesteps)
        return timesteps, noise, target, reference

    def _encoder_kv(self, inputs: dict, count: int, reference: torch.Tensor, timesteps, generator) -> tuple:
        kv = self.networks.kv_encoder(
            reference, timesteps, inputs["ref_text"][:count], inputs["ref_pooled"][:count], inputs["time_ids"][:count]
        )
        return drop_kv_tokens(kv, self.config.dropout.kv_tokens, generator)

    def diffusion_loss(self, inputs: dict, step: int) -> dict[str, Any]:
        config = self.config
        generator = generator_for(config.seed, step, self.rank, "diffusion")
        count = inputs["target"].shape[0]
        timesteps, noise, target, reference = self._noised(
            inputs, count, self.ddpm.config.num_train_timesteps, config.diffusion.importance_alpha, generator
        )
        with self.accelerator.autocast():
            kv = self._encoder_kv(inputs, count, reference, timesteps, generator)
            cond, uncond = self.model.adapter(inputs["clip"])
            tokens = drop_image_tokens(cond, uncond, config.dropout.adapter, generator)
            eps = self.networks.denoiser(
                target, timesteps, inputs["text"], inputs["pooled"], inputs["time_ids"], tokens, 1.0, kv
            )
        loss = F.mse_loss(eps.float(), noise.float()) * config.diffusion.weight
        return {"loss": loss, "diffusion": loss.detach()}

    def lookahead_loss(self, inputs: dict, step: int) -> dict[str, Any]:
        config, lookahead = self.config, self.config.lookahead
        generator = generator_for(config.seed, step, self.rank, "lookahead")
        count = min(lookahead.batch_size, inputs["target"].shape[0])
        timesteps, _, target, reference = self._noised(
            inputs, count, lookahead.max_timestep, lookahead.importance_alpha, generator
        )
        scale = lcm_lora_scale(config.seed, step, lookahead.lcm_scale.every, lookahead.lcm_scale.full_prob,
                               lookahead.lcm_scale.min)  # fmt: skip
        self.lora.set_scale(LCM_ADAPTER, scale)
        with self.accelerator.autocast():
            kv = self._encoder_kv(inputs, count, reference, timesteps, generator)
            cond, _ = self.model.adapter(inputs["clip"][:count])
            eps = self.networks.lcm_denoiser(
                target, timesteps, inputs["text"][:count], inputs["pooled"][:count], inputs["time_ids"][:count],
                cond, 1.0, kv,
            )  # fmt: skip
            latents = lcm_preview(self.lcm_scheduler, eps, target, timesteps)
            preview = self.tiny_vae.decode(latents.to(self.tiny_vae.dtype)).sample.float()

        references = inputs["reference_pixels"][:count]
        found = [self.landmarks(image) for image in to_uint8(preview)]
        valid = [i for i, landmarks in enumerate(found) if landmarks is not None]
        total = preview.new_zeros(())
        result: dict[str, Any] = {"lcm_scale": scale, "faces_missing": count - len(valid), "preview": preview.detach()}
        if valid:
            landmarks = torch.as_tensor(np.stack([found[i] for i in valid]), device=self.device)
            identity = self.identity_loss(
                preview[valid], landmarks, references[valid], inputs["reference_landmarks"][:count][valid]
            ).mean()
            total = total + lookahead.identity_weight * identity
            result["identity"] = identity.detach()
        if self.dreamsim is not None:
            dreamsim = self.dreamsim(preview, references).mean()
            total = total + lookahead.dreamsim_weight * dreamsim
            result["dreamsim"] = dreamsim.detach()
        if self.perceptual is not None:
            perceptual = self.perceptual(preview, references).mean()
            total = total + lookahead.perceptual_weight * perceptual
            result["perceptual"] = perceptual.detach()
        result["loss"] = scale * total
        return result
