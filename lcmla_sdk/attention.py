"""Attention processors for LCM-Lookahead, installed on a diffusers UNet by :func:`lcmla_sdk.wiring.wire_unet`.

Each SDXL transformer block gets two processors:

* ``attn1`` -> :class:`AppendedKVAttnProcessor`: self-attention whose keys/values are extended with
  externally supplied tokens (the KV-encoder's output for this layer). The same processor, when it is
  handed a ``kv_sink``, also *emits* this layer's K/V for the denoiser: the KV-encoder's per-layer
  projections (``to_k_kv``/``to_v_kv``, the authors' ``extract_kv1``) applied to the block's norm1 output.
* ``attn2`` -> :class:`IPAdapterAttnProcessor`: text cross-attention plus decoupled IP-Adapter
  attention over image tokens (``to_k_ip``/``to_v_ip``), weighted by a runtime ``adapter_scale``.

Everything that changes between calls (K/V tensors, image tokens, scale, the sink) arrives as call
arguments through the UNet's ``cross_attention_kwargs``; processors hold only weights and their layer
index, and take no host-side decision on tensor values, so one module traces to ONNX and is captured in a
CUDA graph (verified on the device by ``tests/test_gpu.py``).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads))
    return _merge_heads(out)


def _check_plain_sdxl_attention(attn: Attention, attention_mask: torch.Tensor | None) -> None:
    # The SDXL transformer blocks use none of these Attention options; refusing them keeps the processors short.
    if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
        raise ValueError("LCM-Lookahead processors support plain SDXL attention only (no masks or norms).")


class AppendedKVAttnProcessor(nn.Module):
    """Self-attention over own K/V followed by appended K/V tokens (own tokens first, no extra scale).

    ``kv`` is the flat tuple ``(k_0, v_0, k_1, v_1, ...)`` over all K/V layers; this processor reads the pair at
    ``layer_index``. ``kv=None`` (or a pair with zero tokens) is plain SDXL self-attention. A pair with ``n`` rows
    for a batch of ``N > n`` rows is appended to the last ``n`` rows only.
    """

    def __init__(self, layer_index: int, hidden_size: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.to_k_kv = nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_v_kv = nn.Linear(hidden_size, hidden_size, bias=False)

    def emit(self, hidden_states: torch.Tensor, sink: MutableMapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put this layer's K/V for the denoiser (from the block's norm1 output) into ``sink``."""
        sink[self.layer_index] = (self.to_k_kv(hidden_states), self.to_v_kv(hidden_states))

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        kv: Sequence[torch.Tensor] | None = None,
        kv_sink: MutableMapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        ip_tokens: torch.Tensor | None = None,
        adapter_scale: torch.Tensor | None = None,
        freeu: torch.Tensor | None = None,  # read by the FreeU up-block (lcmla_sdk.freeu), not here
    ) -> torch.Tensor:
        _check_plain_sdxl_attention(attn, attention_mask)
        if kv_sink is not None:
            self.emit(hidden_states, kv_sink)
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if kv is None:
            out = _attend(query, key, value, attn.heads)
        else:
            extra_k, extra_v = kv[2 * self.layer_index], kv[2 * self.layer_index + 1]
            # K/V for fewer rows than the batch belong to its last rows; the first rows attend to their own tokens
            # only. This lets guidance run its no-K/V and full branches in one pass.
            plain = query.shape[0] - extra_k.shape[0]
            appended = _attend(
                query[plain:], torch.cat([key[plain:], extra_k], dim=1), torch.cat([value[plain:], extra_v], dim=1),
                attn.heads,
            )
            if plain == 0:
                out = appended
            else:
                out = torch.cat([_attend(query[:plain], key[:plain], value[:plain], attn.heads), appended])
        return attn.to_out[1](attn.to_out[0](out))


class IPAdapterAttnProcessor(nn.Module):
    """Text cross-attention plus ``adapter_scale`` x attention of the same queries over image tokens.

    ``adapter_scale`` has shape ``(batch,)``: a per-sample strength, so it is a runtime input, not a rebuild.
    ``ip_tokens=None`` is plain SDXL cross-attention.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        kv: Sequence[torch.Tensor] | None = None,
        kv_sink: MutableMapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        ip_tokens: torch.Tensor | None = None,
        adapter_scale: torch.Tensor | None = None,
        freeu: torch.Tensor | None = None,  # read by the FreeU up-block (lcmla_sdk.freeu), not here
    ) -> torch.Tensor:
        _check_plain_sdxl_attention(attn, attention_mask)
        query = attn.to_q(hidden_states)
        out = _attend(query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), attn.heads)
        if ip_tokens is not None:
            image_out = _attend(query, self.to_k_ip(ip_tokens), self.to_v_ip(ip_tokens), attn.heads)
            out = out + adapter_scale.to(out.dtype).view(-1, 1, 1) * image_out
        return attn.to_out[1](attn.to_out[0](out))


class WideHeadAttnProcessor:
    """The VAE decoder's self-attention (one head as wide as the block, over every latent pixel) as two batched
    matrix products and a softmax, in chunks of query rows.

    Fused attention kernels take heads up to 256 wide, so for the VAE's 512-wide head PyTorch falls back to its
    memory-efficient kernel, which ran at a quarter of the GEMMs' speed (4.5 of the 37.7 ms of the compiled decode
    at 1024^2 on an H100). ``torch.baddbmm`` rather than ``matmul``, so Inductor does not fold the products back into
    that kernel. A chunk holds at most :attr:`MAX_SCORES` scores per image and head (128 MiB in fp16); the chunks
    depend on the number of pixels only, so a compiled decode's symbolic batch size stays symbolic. The scores are
    rounded to the input's dtype, as in diffusers' former ``AttnProcessor``; bf16's 8-bit mantissa is too coarse for
    them, so bf16 keeps PyTorch's kernel.
    """

    MAX_SCORES = 2**26

    @classmethod
    def chunk_rows(cls, tokens: int) -> int:
        return max(1, min(tokens, cls.MAX_SCORES // tokens))

    @classmethod
    def peak_bytes(cls, rows: int, tokens: int, itemsize: int) -> int:
        """The scores and probabilities of one chunk, for ``rows`` images x heads over ``tokens`` pixels."""
        return 2 * rows * cls.chunk_rows(tokens) * tokens * itemsize

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ) -> torch.Tensor:  # fmt: skip
        if (encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 4
                or attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None):  # fmt: skip
            raise ValueError("WideHeadAttnProcessor: plain self-attention over a feature map only (the VAE's)")
        batch, channels, height, width = hidden_states.shape
        x = hidden_states.view(batch, channels, height * width)
        x = (attn.group_norm(x) if attn.group_norm is not None else x).transpose(1, 2)
        head_dim = attn.to_q.out_features // attn.heads
        q, k, v = (_split_heads(layer(x), attn.heads).flatten(0, 1) for layer in (attn.to_q, attn.to_k, attn.to_v))
        if q.dtype == torch.bfloat16:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            rows, keys = self.chunk_rows(height * width), k.transpose(1, 2)
            out = torch.cat([torch.bmm(torch.baddbmm(q.new_empty(()), q[:, start : start + rows], keys, beta=0,
                                                     alpha=head_dim**-0.5).softmax(-1), v)
                             for start in range(0, height * width, rows)], 1)  # fmt: skip
        out = _merge_heads(out.view(batch, attn.heads, -1, head_dim))
        out = attn.to_out[1](attn.to_out[0](out)).transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
