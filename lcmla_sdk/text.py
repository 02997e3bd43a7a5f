"""SDXL text conditioning: two CLIP text encoders, penultimate hidden states, pooled embeds, time ids; CLIP tokenizer
files read with errors that name them."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ModelFilesError
from .schema import read_json

TextEncoders = tuple[CLIPTextModel, CLIPTextModelWithProjection]


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
    return run_encoders([x.to(device) for x in tokenize(prompts, tokenizers)], encoders)


class GraphedTextEncoders:
    """Both text encoders captured in a CUDA graph per batch size (at 77 tokens they are launch-bound), replayed on
    new ids; a batch size whose capture fails runs eagerly from then on. One lock: the buffers are shared."""

    def __init__(self, tokenizers: tuple[CLIPTokenizer, CLIPTokenizer], encoders: TextEncoders) -> None:
        self.tokenizers, self.encoders = tokenizers, encoders
        self.lock = threading.Lock()
        self._graphs: dict[int, tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor], torch.cuda.CUDAGraph]] = {}
        self._eager: set[int] = set()

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.encoders[0].device
        ids = [x.to(device) for x in tokenize(prompts, self.tokenizers)]
        batch = len(prompts)
        with self.lock:
            # The buffers are inference tensors (capture may happen inside a generate call); the copies handed out
            # are made outside inference mode, so they are ordinary tensors (training may use them).
            with torch.inference_mode():
                if batch not in self._graphs and batch not in self._eager:
                    try:
                        self._graphs[batch] = self._capture(ids)
                    except RuntimeError:
                        self._eager.add(batch)
                if batch in self._eager:
                    outputs = run_encoders(ids, self.encoders)
                else:
                    static_ids, outputs, graph = self._graphs[batch]
                    for buffer, value in zip(static_ids, ids):
                        buffer.copy_(value)
                    graph.replay()
            return outputs[0].clone(), outputs[1].clone()

    def _capture(self, ids: list[torch.Tensor]):
        static_ids = [x.clone() for x in ids]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_encoders(static_ids, self.encoders)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = run_encoders(static_ids, self.encoders)
        return static_ids, outputs, graph


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
