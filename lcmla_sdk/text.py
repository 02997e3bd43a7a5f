"""SDXL text conditioning: two CLIP text encoders, penultimate hidden states, pooled embeds, time ids; CLIP tokenizer
files read with errors that name them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ModelFilesError
from .schema import read_json


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


def check_tokenizer_files(folder: Path) -> None:
    """JSON objects and UTF-8 text, so that a damaged file is named here rather than by the tokenizers library."""
    for path in sorted(folder.glob("*.json")):
        read_json(path)
    if (folder / "merges.txt").is_file():
        try:
            (folder / "merges.txt").read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise ModelFilesError(f"{folder / 'merges.txt'}: not UTF-8 text: {error}") from None


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer from local files; unusable files are a :class:`ModelFilesError` naming the folder."""
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # the tokenizers library raises plain ``Exception`` for bad vocabularies and merges
        raise ModelFilesError(f"{folder}: unusable CLIP tokenizer files: {str(error).splitlines()[0]}") from None
