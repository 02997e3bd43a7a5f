"""A UNet wired for LCM-Lookahead, and the load/save pair of the weights the wiring adds.

Wiring puts LCM-Lookahead's two attention processors (:mod:`lcmla_sdk.attention`) on every SDXL transformer block
and the ``kv_encoder`` LoRA, as the authors place it, on the same UNet (a peft adapter: :mod:`lcmla_sdk.lora`).
Every path that needs a wired UNet (loading a model directory, ``lcmla convert``, the random presets,
:class:`~lcmla_sdk.Personalizer`) calls :func:`wire_unet`; saving reads the added weights back with
:func:`lookahead_weights`.

The added weights are stored in three parts (:class:`LookaheadWeights`) under the diffusers name of their
transformer block: ``<block>.to_k_ip.weight``/``<block>.to_v_ip.weight`` (IP-Adapter K/V of attn2),
``<block>.to_k_kv.weight``/``<block>.to_v_kv.weight`` (the KV-encoder's K/V projections, the authors'
``extract_kv1``), and the LoRA under peft's names without the adapter name, as diffusers saves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import set_peft_model_state_dict
from torch import nn

from .attention import AppendedKVAttnProcessor, IPAdapterAttnProcessor
from .lora import KV_ENCODER_ADAPTER, adapter_state, add_adapter, has_adapter
from .weights import check_shapes, shapes

Tensors = dict[str, torch.Tensor]
PARTS = ("ip_kv", "kv_projections", "kv_lora")  # the fields of LookaheadWeights, in loading order


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
    blocks = _install_processors(unet)
    expected = lookahead_shapes(unet, kv_encoder)
    projections = {**_projections(unet, blocks, "ip"), **_projections(unet, blocks, "kv")}
    lora = kv_encoder_lora_config(blocks, kv_encoder["lora_rank"], kv_encoder.get("kv_lora_rank"))
    weights = weights or LookaheadWeights()
    given = {part: getattr(weights, part) for part in PARTS if getattr(weights, part) is not None}
    for part, state in given.items():
        source = weights.sources.get(part, part) + (" (KV-encoder LoRA)" if part == "kv_lora" else "")
        check_shapes(expected[part], shapes(state), source)
    with torch.no_grad():
        for key, value in {**given.get("ip_kv", {}), **given.get("kv_projections", {})}.items():
            projections[key].weight.copy_(value)
    if not has_adapter(unet, KV_ENCODER_ADAPTER):
        device = next(unet.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            add_adapter(unet, lora, KV_ENCODER_ADAPTER)
    if "kv_lora" in given:
        set_peft_model_state_dict(unet, given["kv_lora"], adapter_name=KV_ENCODER_ADAPTER)
    return blocks


def kv_block_names(unet: UNet2DConditionModel) -> list[str]:
    """Names of the transformer blocks whose self-attention takes appended K/V, in forward order.

    For SDXL this is the authors' 70-block list (down_blocks.1/2, mid_block, up_blocks.0/1).
    """
    # The UNet registers mid_block after up_blocks, so walk the stages explicitly in forward order.
    stages = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
    stages += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    names = []
    for stage in stages:
        for name, module in unet.get_submodule(stage).named_modules(prefix=stage):
            if isinstance(module, BasicTransformerBlock):
                names.append(name)
    return names


def _install_processors(unet: UNet2DConditionModel) -> list[str]:
    """Install the two processors on every SDXL transformer block; return the K/V block names in order.

    Blocks that already carry them are left as they are, so calling this on a wired UNet changes nothing.

    The K/V projections start as copies of the block's ``attn1.to_k``/``to_v`` (as the authors initialise
    ``extract_kv1``); the IP projections start at zero until adapter weights are loaded.
    """
    names = kv_block_names(unet)
    for index, name in enumerate(names):
        block = unet.get_submodule(name)
        self_attn, cross_attn = block.attn1, block.attn2
        if isinstance(self_attn.processor, AppendedKVAttnProcessor):
            continue
        appended = AppendedKVAttnProcessor(index, self_attn.inner_dim)
        appended.to_k_kv.weight.data.copy_(self_attn.to_k.weight.data)
        appended.to_v_kv.weight.data.copy_(self_attn.to_v.weight.data)
        ip = IPAdapterAttnProcessor(cross_attn.inner_dim, cross_attn.cross_attention_dim)
        nn.init.zeros_(ip.to_k_ip.weight)
        nn.init.zeros_(ip.to_v_ip.weight)
        param = self_attn.to_k.weight
        self_attn.set_processor(appended.to(device=param.device, dtype=param.dtype))
        cross_attn.set_processor(ip.to(device=param.device, dtype=param.dtype))
    return names


def kv_encoder_lora_config(kv_blocks: list[str], rank: int, kv_rank: int | None = None) -> LoraConfig:
    """The KV-encoder LoRA as the authors add it: no alpha scaling (alpha = rank), A ~ N(0, 1/r), B = 0.

    ``kv_rank`` is the rank on the K/V projections (default ``rank``); 0 means they carry no LoRA (it was fused).
    The last K/V block's own attention never influences any emitted K/V (they are taken from its norm1 output), so
    its attn1/attn2 get no LoRA; its K/V projections do.
    """
    kv_rank = rank if kv_rank is None else kv_rank
    targets = []
    for block in kv_blocks[:-1]:
        for attn in ("attn1", "attn2"):
            targets += [f"{block}.{attn}.{proj}" for proj in ("to_q", "to_k", "to_v", "to_out.0")]
    if kv_rank:
        for block in kv_blocks:
            targets += [f"{block}.attn1.processor.to_k_kv", f"{block}.attn1.processor.to_v_kv"]
    pattern = {"to_k_kv": kv_rank, "to_v_kv": kv_rank} if kv_rank else {}
    return LoraConfig(r=rank, lora_alpha=rank, rank_pattern=pattern, alpha_pattern=pattern,
                      init_lora_weights="gaussian", target_modules=targets)  # fmt: skip


def lookahead_weights(unet: UNet2DConditionModel) -> LookaheadWeights:
    """The weights :func:`wire_unet` added to ``unet``, as they are now (tensors shared, not copied)."""
    blocks = kv_block_names(unet)
    return LookaheadWeights(
        ip_kv={key: layer.weight.detach() for key, layer in _projections(unet, blocks, "ip").items()},
        kv_projections={key: layer.weight.detach() for key, layer in _projections(unet, blocks, "kv").items()},
        kv_lora=adapter_state(unet, KV_ENCODER_ADAPTER),
    )


def lookahead_shapes(unet: UNet2DConditionModel, kv_encoder: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """Keys and shapes of the weights :func:`wire_unet` adds, by part of :class:`LookaheadWeights`, read from a
    plain UNet (one built on the meta device will do) without wiring it: the processors' projections as
    :func:`_install_processors` makes them, and the LoRA's ``lora_A``/``lora_B`` under peft's names, as saved."""
    blocks = kv_block_names(unet)
    parts: dict[str, dict[str, tuple[int, ...]]] = {"ip_kv": {}, "kv_projections": {}, "kv_lora": {}}
    for block in blocks:
        self_attn, cross_attn = unet.get_submodule(block).attn1, unet.get_submodule(block).attn2
        for name in ("to_k_ip", "to_v_ip"):
            parts["ip_kv"][f"{block}.{name}.weight"] = (cross_attn.inner_dim, cross_attn.cross_attention_dim)
        for name in ("to_k_kv", "to_v_kv"):
            parts["kv_projections"][f"{block}.{name}.weight"] = (self_attn.inner_dim, self_attn.inner_dim)
    lora = kv_encoder_lora_config(blocks, kv_encoder["lora_rank"], kv_encoder.get("kv_lora_rank"))
    for target in lora.target_modules:
        *owner, name = target.split(".processor.")
        rank = lora.rank_pattern.get(name, lora.r) if owner else lora.r
        layer = unet.get_submodule(owner[0]) if owner else unet.get_submodule(target)
        width = (layer.inner_dim, layer.inner_dim) if owner else (layer.in_features, layer.out_features)
        parts["kv_lora"][f"{target}.lora_A.weight"] = (rank, width[0])
        parts["kv_lora"][f"{target}.lora_B.weight"] = (width[1], rank)
    return parts


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
