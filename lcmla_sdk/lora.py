"""peft LoRA adapters on the one shared SDXL UNet.

Two adapters can live on the same base layers: ``kv_encoder`` (rank-4 LoRA of the KV-encoder: attn1/attn2
q/k/v/out in 69 blocks and the K/V projections in all 70, placed by :func:`lcmla_sdk.wiring.wire_unet`) and ``lcm``
(an SDXL LCM-LoRA).

The peft UNet is where weights are loaded, trained and saved. Inference never switches adapters on it: each network
gets its own plain UNet from :func:`materialize`, with its adapters merged into copies of the layers they adapt and
every other weight shared, so which adapter a network uses is fixed when it is built. Training, which needs the
unmerged LoRA weights, activates adapters on the peft UNet with :func:`activate_adapters`.
"""

from __future__ import annotations

import copy
import re
import warnings
import weakref

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

KV_ENCODER_ADAPTER = "kv_encoder"
LCM_ADAPTER = "lcm"

# Module suffixes an SDXL LCM-LoRA adapts (every linear and conv of the transformer and resnet layers).
LCM_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
)  # fmt: skip


def add_random_lcm_lora(unet: UNet2DConditionModel, rank: int) -> None:
    """Attach an ``lcm`` adapter with random (non-zero) weights: the tiny preset's stand-in for an LCM-LoRA."""
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(LCM_LORA_TARGETS))
    add_adapter(unet, config, LCM_ADAPTER)


def add_adapter(unet: UNet2DConditionModel, config: LoraConfig, name: str) -> None:
    """peft's ``add_adapter`` under ``name``, beside the adapters the UNet has already."""
    with warnings.catch_warnings():
        # Several adapters on one model is the design here, not the mistake peft warns about.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(config, adapter_name=name)


def has_adapter(unet: nn.Module, name: str) -> bool:
    return any(isinstance(m, BaseTunerLayer) and name in m.lora_A for m in unet.modules())


def _lora_layers(unet: nn.Module) -> list[BaseTunerLayer]:
    """The UNet's LoRA layers, cached until its set of adapters changes (a module walk is slow)."""
    key = tuple(sorted(getattr(unet, "peft_config", {})))
    cached = _LAYER_CACHE.get(unet)
    if cached is None or cached[0] != key:
        cached = (key, [m for m in unet.modules() if isinstance(m, BaseTunerLayer)])
        _LAYER_CACHE[unet] = cached
    return cached[1]


_LAYER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_state(unet: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights under the names peft saves them by (``...lora_A.weight``): what peft's
    ``get_peft_model_state_dict`` returns, which matches every key against every adapted module (6 s for the tiny
    preset at every save); read here from one pass over the state dict. Adapters with a bias, DoRA magnitudes or
    modules to save, which this does not read, go through peft's function."""
    config = unet.peft_config[name]
    if config.bias != "none" or config.use_dora or config.modules_to_save:
        return get_peft_model_state_dict(unet, adapter_name=name)
    suffix = re.compile(rf"\.(lora_[AB])\.{re.escape(name)}\.weight$")
    return {suffix.sub(r".\1.weight", key): value for key, value in unet.state_dict().items() if suffix.search(key)}


def activate_adapters(unet: nn.Module, names: tuple[str, ...]) -> None:
    """Make exactly ``names`` active on every LoRA layer of ``unet`` (absent names are skipped per layer).

    peft's ``set_adapter`` would also rewrite ``requires_grad``, which is the trainer's decision and costs
    a parameter walk per call; this sets only the active list, as the last line of ``set_adapter`` does.
    """
    for layer in _lora_layers(unet):
        wanted = [name for name in names if name in layer.lora_A]
        if layer.active_adapters != wanted:
            layer._active_adapter = wanted


def materialize(unet: nn.Module, adapters: tuple[str, ...]) -> nn.Module:
    """A plain (peft-free) copy of ``unet`` that computes exactly the peft UNet with ``adapters`` active.

    Layers that none of ``adapters`` adapts are the peft layers' own base modules (no copy). A layer that one does
    becomes a new module whose weight is ``base + sum of the adapters' deltas`` (peft's ``get_delta_weight``, in
    fp32, rounded once to the weight's dtype). The peft UNet is left untouched; a later change of its weights is
    not seen by the copy (build a new one).
    """
    if isinstance(unet, BaseTunerLayer):
        return _merged_layer(unet, adapters)
    clone = copy.copy(unet)
    # A shallow copy would share the registration dicts (parameters, buffers, hooks, config); give it its own, so
    # replacing a child or adding a hook stays local to the copy.
    clone.__dict__.update({key: copy.copy(value) for key, value in vars(unet).items() if isinstance(value, dict)})
    clone._modules = {name: materialize(child, adapters) if child is not None else None
                      for name, child in unet._modules.items()}  # fmt: skip
    return clone


@torch.no_grad()
def _merged_layer(layer: BaseTunerLayer, adapters: tuple[str, ...]) -> nn.Module:
    base = layer.get_base_layer()
    present = [name for name in adapters if name in layer.lora_A]
    if not present:
        return base
    merged = copy.copy(base)
    merged.__dict__.update({key: copy.copy(value) for key, value in vars(base).items() if isinstance(value, dict)})
    weight = base.weight.float() + sum(layer.get_delta_weight(name).float() for name in present)
    merged.weight = nn.Parameter(weight.to(base.weight.dtype), requires_grad=False)
    return merged
