"""A UNet wired for LCM-Lookahead, and the load/save pair of the weights the wiring adds.

Wiring puts LCM-Lookahead's two attention processors on every SDXL transformer block (:mod:`lcmla_sdk.attention`)
and the ``kv_encoder`` LoRA on the same UNet (:mod:`lcmla_sdk.lora`). Every path that needs a wired UNet (loading a
model directory, ``lcmla convert``, the random presets, :class:`~lcmla_sdk.Personalizer`) calls :func:`wire_unet`;
saving reads the added weights back with :func:`lookahead_weights`.

The added weights are stored in three parts (:class:`LookaheadWeights`) under the diffusers name of their
transformer block: ``<block>.to_k_ip.weight``/``<block>.to_v_ip.weight`` (IP-Adapter K/V of attn2),
``<block>.to_k_kv.weight``/``<block>.to_v_kv.weight`` (the KV-encoder's K/V projections, the authors'
``extract_kv1``), and the LoRA under peft's names without the adapter name, as diffusers saves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from .attention import install_lookahead_processors, kv_block_names
from .lora import KV_ENCODER_ADAPTER, add_kv_encoder_lora, has_adapter
from .weights import check_shapes, shapes

Tensors = dict[str, torch.Tensor]


@dataclass
class LookaheadWeights:
    """LCM-Lookahead's own weights on the shared UNet, as stored; a part left ``None`` is not given."""

    ip_kv: Tensors | None = None  # IP-Adapter K/V of every attn2
    kv_projections: Tensors | None = None  # the KV-encoder's K/V projections
    kv_lora: Tensors | None = None  # the KV-encoder's LoRA
    sources: dict[str, str] = field(default_factory=dict)  # part -> where it was read, for error messages


def wire_unet(
    unet: UNet2DConditionModel, kv_encoder: dict, weights: LookaheadWeights | None = None, seed: int = 0
) -> list[str]:
    """Install the processors and the KV-encoder LoRA (``kv_encoder``: its ``lora_rank`` and ``kv_lora_rank``) on
    ``unet``, keeping what is there already, then load the given parts of ``weights``; return the K/V block names in
    forward order.

    Parts not given keep their initial values: IP K/V zero, K/V projections copies of attn1's K/V, and the LoRA as the
    authors initialise it (A ~ N(0, 1/r), B = 0), drawn from ``seed`` without touching the global random state.
    """
    blocks = install_lookahead_processors(unet)
    if not has_adapter(unet, KV_ENCODER_ADAPTER):
        device = next(unet.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            add_kv_encoder_lora(unet, blocks, kv_encoder["lora_rank"], kv_encoder.get("kv_lora_rank"))
    weights = weights or LookaheadWeights()
    for kind, part in (("ip", "ip_kv"), ("kv", "kv_projections")):
        if getattr(weights, part) is not None:
            _load_projections(unet, blocks, kind, getattr(weights, part), weights.sources.get(part, part))
    if weights.kv_lora is not None:
        source = f"{weights.sources.get('kv_lora', 'kv_lora')} (KV-encoder LoRA)"
        check_shapes(shapes(_lora_state(unet)), shapes(weights.kv_lora), source)
        with torch.no_grad():
            set_peft_model_state_dict(unet, weights.kv_lora, adapter_name=KV_ENCODER_ADAPTER)
    return blocks


def lookahead_weights(unet: UNet2DConditionModel) -> LookaheadWeights:
    """The weights :func:`wire_unet` added to ``unet``, as they are now (tensors shared, not copied)."""
    blocks = kv_block_names(unet)
    return LookaheadWeights(
        ip_kv={key: layer.weight.detach() for key, layer in _projections(unet, blocks, "ip").items()},
        kv_projections={key: layer.weight.detach() for key, layer in _projections(unet, blocks, "kv").items()},
        kv_lora=_lora_state(unet),
    )


def base_unet_state(unet: UNet2DConditionModel) -> Tensors:
    """The SDXL UNet's own weights under diffusers' names: no LoRA, no LCM-Lookahead projections."""
    return {
        k.replace(".base_layer", ""): v
        for k, v in unet.state_dict().items() if "lora_" not in k and ".processor." not in k
    }  # fmt: skip


def base_linear(layer: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` under a peft LoRA wrapper (or the layer itself)."""
    return layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer


def _projections(unet: UNet2DConditionModel, blocks: list[str], kind: str) -> dict[str, nn.Linear]:
    """``kind="ip"``: the IP-Adapter K/V layers; ``kind="kv"``: the KV-encoder's K/V projections; by stored key."""
    attn, names = ("attn2", ("to_k_ip", "to_v_ip")) if kind == "ip" else ("attn1", ("to_k_kv", "to_v_kv"))
    layers = {}
    for block in blocks:
        processor = getattr(unet.get_submodule(block), attn).processor
        for name in names:
            layers[f"{block}.{name}.weight"] = base_linear(getattr(processor, name))
    return layers


@torch.no_grad()
def _load_projections(unet: UNet2DConditionModel, blocks: list[str], kind: str, state: Tensors, source: str) -> None:
    layers = _projections(unet, blocks, kind)
    check_shapes({key: layer.weight.shape for key, layer in layers.items()}, shapes(state), source)
    for key, layer in layers.items():
        layer.weight.copy_(state[key])


def _lora_state(unet: UNet2DConditionModel) -> Tensors:
    return get_peft_model_state_dict(unet, adapter_name=KV_ENCODER_ADAPTER)
