"""SDXL text conditioning: two CLIP text encoders, penultimate hidden states, pooled embeds, time ids; CLIP tokenizer
files read with errors that name them."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .cuda_graphs import GraphCache, capture
from .errors import ModelFilesError
from .transfer import device_tensor, to_device

TextEncoders = tuple[CLIPTextModel, CLIPTextModelWithProjection]
TEXT_GRAPH_BYTES = 2 * 2**30  # captured text encoders kept per model (least recently used out)


def tokenize(prompts: list[str], tokenizers: tuple[CLIPTokenizer, CLIPTokenizer]) -> list[torch.Tensor]:
    """Each tokenizer's ``(N, 77)`` ids, padded and truncated as diffusers' SDXL pipeline does."""
    return [
        tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        for tokenizer in tokenizers
    ]  # fmt: skip


def run_encoders(ids: list[torch.Tensor], encoders: TextEncoders) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text (N, 77, d1 + d2), pooled (N, d2_proj))``: penultimate hidden states of both encoders, and the last
    encoder's projected pooled output (text_embeds). Device tensors only: it can be captured in a CUDA graph."""
    hidden = []
    for tokens, encoder in zip(ids, encoders):
        out = encoder(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out[0]


@torch.no_grad()
def encode_prompts(
    prompts: list[str], tokenizers: tuple[CLIPTokenizer, CLIPTokenizer], encoders: TextEncoders
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text (N, 77, d1 + d2), pooled (N, d2_proj))`` as diffusers' SDXL pipeline computes them."""
    device = encoders[0].device
    return run_encoders([to_device(x, device) for x in tokenize(prompts, tokenizers)], encoders)


class GraphedTextEncoders:
    """Both text encoders captured in a CUDA graph per batch size (at 77 tokens they are launch-bound) and replayed on
    new ids (:mod:`lcmla_sdk.cuda_graphs`: a batch size whose capture fails runs eagerly)."""

    def __init__(self, encoders: TextEncoders) -> None:
        self.encoders = encoders
        self.graphs = GraphCache("the text encoders at this batch size", TEXT_GRAPH_BYTES)

    def __call__(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        def run(static_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            return run_encoders(static_ids, self.encoders)

        with self.graphs.lock:
            # The buffers are inference tensors (capture may happen inside a generate call); the copies handed out
            # are made outside inference mode, so they are ordinary tensors (training may use them).
            with torch.inference_mode():
                graph = self.graphs.get(ids[0].shape[0], lambda: capture(run, [x.clone() for x in ids]))
                if graph is None:
                    outputs = run(ids)
                else:
                    for buffer, value in zip(graph.inputs, ids):
                        buffer.copy_(value)
                    graph.replay()
                    outputs = graph.outputs
            return outputs[0].clone(), outputs[1].clone()


class PromptEncoder:
    """Prompts -> SDXL text conditioning on the encoders' device, replayed from CUDA graphs when asked; the
    K/V-encoder's own prompt (it never changes) encoded once."""

    def __init__(self, tokenizers: tuple[CLIPTokenizer, CLIPTokenizer], encoders: TextEncoders, encoder_prompt: str) -> None:
        self.tokenizers, self.encoders = tokenizers, encoders
        self.encoder_prompt_text = encoder_prompt
        self.graphed = GraphedTextEncoders(encoders)
        self._lock = threading.Lock()
        self._encoder_prompt: tuple[torch.Tensor, torch.Tensor] | None = None

    def encode(self, prompts: list[str], graphs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text, pooled)`` of the prompts; ``graphs``: through :class:`GraphedTextEncoders` (a CUDA device)."""
        if not graphs:
            return encode_prompts(prompts, self.tokenizers, self.encoders)
        device = self.encoders[0].device
        return self.graphed([to_device(x, device) for x in tokenize(prompts, self.tokenizers)])

    def __call__(self, prompts: list[str], negatives: list[str] | None, graphs: bool = False):
        """``(text, pooled)`` for the prompts and for the negatives (zeros for an absent negative prompt)."""
        text, pooled = self.encode(prompts, graphs)
        if negatives is None:
            return (text, pooled), (torch.zeros_like(text), torch.zeros_like(pooled))
        return (text, pooled), self.encode(negatives, graphs)

    def encoder_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V-encoder's prompt, ``(1, 77, d)`` and ``(1, d)`` (encoded once, eagerly)."""
        with self._lock:
            if self._encoder_prompt is None:
                self._encoder_prompt = self.encode([self.encoder_prompt_text])
            return self._encoder_prompt


def time_ids(height: int, width: int, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` with no crop."""
    return device_tensor([[height, width, 0, 0, height, width]], device, dtype).expand(batch, 6)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer from local files; unusable files are a :class:`ModelFilesError` naming the folder."""
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # the tokenizers library raises plain ``Exception`` for bad vocabularies and merges
        raise ModelFilesError(f"{folder}: unusable CLIP tokenizer files: {str(error).splitlines()[0]}") from None
