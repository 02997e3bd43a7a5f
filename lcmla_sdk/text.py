"""SDXL text conditioning: two CLIP text encoders, penultimate hidden states, pooled embeds, time ids."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


@torch.no_grad()
def encode_prompts(
    prompts: list[str],
    tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
    encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text (N, 77, d1 + d2), pooled (N, d2_proj))`` as diffusers' SDXL pipeline computes them."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
    return torch.cat(hidden, dim=-1), pooled


def time_ids(height: int, width: int, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` with no crop."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).expand(batch, 6)
