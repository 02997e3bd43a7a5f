"""The three LCM-Lookahead networks as plain-tensor modules over one shared diffusers UNet.

* :class:`Denoiser`  ``(latent, t, text, pooled_text, time_ids, image_tokens, adapter_scale, kv, freeu) -> eps``
* :class:`KVEncoder` ``(latent, t, text, pooled_text, time_ids) -> (k_0, v_0, ..., k_69, v_69)``
* :class:`ImageAdapter` ``(pixel_values) -> (cond_tokens, uncond_tokens)``

Inputs and outputs are tensors only and no forward reads a tensor's value on the host, so each module exports to
ONNX and is captured in a CUDA graph. Each UNet network wraps a plain UNet from :func:`lcmla_sdk.lora.materialize`:
its adapters are merged into its own copies of the layers they adapt, and every other weight is shared with the
other networks (one copy of the base weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D
from torch import nn
from transformers import CLIPVisionModelWithProjection


def _batch_vector(value: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A per-sample ``(batch,)`` tensor from a scalar, 0-d or ``(batch,)`` input. A tensor already on ``like``'s
    device is only reshaped (no host copy, so this is safe inside a CUDA-graph capture); a Python number is an
    eager-mode convenience."""
    value = torch.as_tensor(value, device=like.device, dtype=torch.float32)
    return value.reshape(-1).expand(batch) if value.numel() == 1 else value.reshape(batch)


class Denoiser(nn.Module):
    """SDXL UNet whose self-attention layers also attend to appended K/V and whose cross-attention adds
    IP-Adapter attention over image tokens.

    ``unet`` is the authors' frozen decoder (no adapter) or, for fast mode, the same with the LCM-LoRA merged.
    ``kv=None`` and ``image_tokens=None`` give plain SDXL; K/V with fewer rows than ``latent`` are appended to its
    last rows only (see :class:`~lcmla_sdk.attention.AppendedKVAttnProcessor`). ``freeu`` = (b, s) applies FreeU's
    second stage as the authors do (:mod:`lcmla_sdk.freeu`; only on a UNet prepared with ``install_freeu``).
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        pooled_text: torch.Tensor,
        time_ids: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        adapter_scale: torch.Tensor | float = 1.0,
        kv: Sequence[torch.Tensor] | None = None,
        freeu: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"kv": kv, "ip_tokens": image_tokens}
        if freeu is not None:
            kwargs["freeu"] = freeu
        if image_tokens is not None:
            kwargs["adapter_scale"] = _batch_vector(adapter_scale, latent.shape[0], latent)
        return self.unet(
            latent,
            timestep,
            encoder_hidden_states=text,
            added_cond_kwargs={"text_embeds": pooled_text, "time_ids": time_ids},
            cross_attention_kwargs=kwargs,
            return_dict=False,
        )[0]


class KVEncoder(nn.Module):
    """The UNet with the ``kv_encoder`` LoRA merged, run only as far as the last K/V projection.

    Returns the flat tuple ``(k_0, v_0, k_1, v_1, ...)`` in the denoiser's consumption order; each
    tensor is ``(batch, face_tokens_at_that_layer, layer_width)``. The encoder's cross-attention sees
    only its text prompt (no image tokens), as in the authors' encoder.
    """

    def __init__(self, unet: UNet2DConditionModel, num_layers: int) -> None:
        super().__init__()
        self.unet = unet
        self.num_layers = num_layers

    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        pooled_text: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        sink: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._run_until_all_kv(latent, timestep, text, {"text_embeds": pooled_text, "time_ids": time_ids}, sink)
        if len(sink) != self.num_layers:
            raise RuntimeError(f"KV-encoder collected {len(sink)} of {self.num_layers} K/V layers.")
        return tuple(tensor for index in range(self.num_layers) for tensor in sink[index])

    def _run_until_all_kv(self, sample, timestep, text, added_cond, sink) -> None:
        # UNet2DConditionModel.forward's own steps, stopped at the last K/V projection (for SDXL: inside the last
        # transformer block of up_blocks[1]; the rest of that block, its upsampler, up_blocks[2] and conv_out never
        # run: 3.3% of the encoder's work at 1024^2).
        unet = self.unet
        attn_kwargs = {"kv_sink": sink}
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added_cond)
        sample = unet.conv_in(sample)
        residuals = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(sample, emb, encoder_hidden_states=text, cross_attention_kwargs=attn_kwargs)
            else:
                sample, res = block(sample, emb)
            residuals += res
        sample = unet.mid_block(sample, emb, encoder_hidden_states=text, cross_attention_kwargs=attn_kwargs)
        for block in unet.up_blocks:
            if len(sink) == self.num_layers:
                return
            res, residuals = residuals[-len(block.resnets) :], residuals[: -len(block.resnets)]
            if self._ends_in(block):
                return _up_block_until_last_kv(block, sample, res, emb, text, sink)
            sample = block(
                sample,
                res_hidden_states_tuple=res,
                temb=emb,
                encoder_hidden_states=text,
                cross_attention_kwargs=attn_kwargs,
                upsample_size=residuals[-1].shape[2:] if residuals else None,
            )

    def _ends_in(self, block: nn.Module) -> bool:
        """Whether the last K/V layer is the self-attention of the last transformer block of ``block`` and
        :func:`_up_block_until_last_kv` computes what diffusers' modules would up to it: diffusers' own classes,
        FreeU off, no hooks on the modules whose forward it replaces, no gradient checkpointing (else the whole
        block runs)."""
        freeu = all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2"))  # diffusers' enable_freeu
        if type(block) is not CrossAttnUpBlock2D or freeu:
            return False
        last = block.attentions[-1]
        if type(last) is not Transformer2DModel or not last.is_input_continuous:
            return False
        inner = last.transformer_blocks[-1]
        processor = inner.attn1.processor
        replaced = (block, last, inner, inner.attn1)
        checkpointing = torch.is_grad_enabled() and any(m.gradient_checkpointing for m in (block, *block.attentions))
        return (type(inner) is BasicTransformerBlock and getattr(processor, "layer_index", None) == self.num_layers - 1
                and hasattr(processor, "emit") and inner.norm_type == "layer_norm" and inner.pos_embed is None
                and not inner.only_cross_attention and not checkpointing
                and not any(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_diffusers_hook", None)
                            for m in replaced))  # fmt: skip


def _up_block_until_last_kv(block, sample, residuals, emb, text, sink) -> None:
    """diffusers' ``CrossAttnUpBlock2D`` (FreeU off) until its last transformer block's norm1, whose output gives the
    last K/V; the rest of that block and the upsampler are not needed."""
    kwargs = {"kv_sink": sink}
    for resnet, transformer in zip(block.resnets, block.attentions):
        sample, residuals = resnet(torch.cat([sample, residuals[-1]], dim=1), emb), residuals[:-1]
        if transformer is not block.attentions[-1]:
            sample = transformer(sample, text, cross_attention_kwargs=kwargs, return_dict=False)[0]
    hidden, _ = transformer._operate_on_continuous_inputs(sample)
    for inner in transformer.transformer_blocks[:-1]:
        hidden = inner(hidden, encoder_hidden_states=text, cross_attention_kwargs=kwargs)
    last = transformer.transformer_blocks[-1]
    last.attn1.processor.emit(last.norm1(hidden), sink)


class ImageAdapter(nn.Module):
    """CLIP vision tower (penultimate hidden states) -> IP-Adapter Plus resampler -> image tokens.

    The unconditional tokens are the same path applied to an all-zero input, computed in the same batch.
    """

    def __init__(self, image_encoder: CLIPVisionModelWithProjection, resampler: IPAdapterPlusImageProjection) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.resampler = resampler

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([pixel_values, torch.zeros_like(pixel_values)])
        hidden = self.image_encoder(both, output_hidden_states=True).hidden_states[-2]
        tokens = self.resampler(hidden)
        return tokens[: pixel_values.shape[0]], tokens[pixel_values.shape[0] :]
