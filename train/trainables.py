"""What trains, at which learning rate, and how the shared UNet's LoRA state survives gradient checkpointing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

from lcmla_sdk.lora import KV_ENCODER_ADAPTER, LCM_ADAPTER, activate_adapters
from lcmla_sdk.networks import Denoiser, KVEncoder
from lcmla_sdk.pipeline import Personalizer
from lcmla_sdk.sampling import Networks

from .config import OptimConfig


def trainable_parameters(model: Personalizer) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The authors' two optimiser groups (``official_method_facts.md`` section 11), by qualified name.

    ``encoder``: the KV-encoder LoRA on attn1/attn2 q/k/v/out and on the K/V projections (all ``kv_encoder`` peft
    weights). ``adapter``: the whole resampler and the IP K/V projections. Everything else stays frozen.
    """
    encoder, adapter = [], []
    for name, param in model.unet.named_parameters():
        if f".lora_A.{KV_ENCODER_ADAPTER}." in name or f".lora_B.{KV_ENCODER_ADAPTER}." in name:
            encoder.append((f"unet.{name}", param))
        elif name.endswith(("processor.to_k_ip.weight", "processor.to_v_ip.weight")):
            adapter.append((f"unet.{name}", param))
    adapter += [(f"resampler.{name}", param) for name, param in model.adapter.resampler.named_parameters()]
    return {"encoder": encoder, "adapter": adapter}


def make_trainable(groups: dict[str, list[tuple[str, nn.Parameter]]]) -> list[nn.Parameter]:
    """Trainables in fp32 with gradients on; the frozen weights keep their (half) precision."""
    params = []
    for named in groups.values():
        for _, param in named:
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
    return params


def make_optimizer(groups: dict[str, list[tuple[str, nn.Parameter]]], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the two groups, each at its learning rate (``optim.lr_encoder``, ``optim.lr_adapter``)."""
    return torch.optim.AdamW(
        [
            {"params": [p for _, p in groups["encoder"]], "lr": optim.lr_encoder, "name": "encoder"},
            {"params": [p for _, p in groups["adapter"]], "lr": optim.lr_adapter, "name": "adapter"},
        ],
        betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
    )  # fmt: skip


class _WithAdapters(nn.Module):
    """A network over the peft UNet that activates its adapters before each forward (training needs the LoRA
    weights unmerged, to train them; inference uses merged copies instead)."""

    def __init__(self, network: nn.Module, adapters: tuple[str, ...]) -> None:
        super().__init__()
        self.network, self.adapters = network, adapters

    def forward(self, *args, **kwargs):
        activate_adapters(self.network.unet, self.adapters)
        return self.network(*args, **kwargs)


def training_networks(model: Personalizer) -> Networks:
    """The K/V-encoder and the denoisers over ``model.unet`` itself, so gradients reach its peft LoRA weights."""
    unet = model.unet
    return Networks(
        kv_encoder=_WithAdapters(KVEncoder(unet, len(model.kv_blocks)), (KV_ENCODER_ADAPTER,)),
        denoiser=_WithAdapters(Denoiser(unet), ()),
        lcm_denoiser=_WithAdapters(Denoiser(unet), (LCM_ADAPTER,)) if model.has_lcm else None,
        adapter=model.adapter,
    )


class SharedUNetLora:
    """The peft adapters of the one shared UNet: their per-network activation and the LCM-LoRA scale.

    Used as the UNet's gradient-checkpointing function it recomputes every block under the LoRA state the block first
    ran with. Without that, backward would recompute the KV-encoder's blocks with the denoiser's adapters active (the
    last ones activated), which is a different function.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
        self.probes = {name: next(l for l in self.layers if name in l.lora_A) for name in sorted(unet.peft_config)}
        self.scales = {name: 1.0 for name in self.probes}

    def set_scale(self, adapter: str, scale: float) -> None:
        """Scale an adapter's contribution (peft's ``set_scale``: ``scale * alpha / r``) on every layer."""
        if self.scales[adapter] == scale:
            return
        for layer in self.layers:
            if adapter in layer.lora_A:
                layer.set_scale(adapter, scale)
        self.scales[adapter] = scale

    def snapshot(self) -> tuple:
        active = tuple(name for name, probe in self.probes.items() if name in probe.active_adapters)
        return active, tuple(self.scales.items())

    def restore(self, state: tuple) -> None:
        if self.snapshot() == state:
            return
        active, scales = state
        activate_adapters(self.unet, active)
        for adapter, scale in scales:
            self.set_scale(adapter, scale)

    def checkpoint(self, module: nn.Module, *args):
        """diffusers' ``gradient_checkpointing_func`` signature; non-reentrant, so the K/V that the encoder's
        processors hand out through their sink (not through the block's outputs) are recomputed too."""
        state = self.snapshot()

        def run(*inputs):
            self.restore(state)
            return module(*inputs)

        return checkpoint(run, *args, use_reentrant=False)


def average_gradients(params: Sequence[nn.Parameter], reduce) -> None:
    """Average the gradients over processes with one flat all-reduce (``reduce`` = ``accelerator.reduce``).

    The trainables sit inside a frozen multi-gigabyte UNet that three networks share, so instead of wrapping it in
    DistributedDataParallel the few trainable tensors are synchronised here, after each backward.
    """
    grads = []
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    flat = reduce(torch._utils._flatten_dense_tensors(grads), reduction="mean")
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def checksum(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """One float64 number that differs between processes as soon as any trainable does."""
    return torch.stack([p.detach().double().sum() + p.detach().double().abs().sum() for p in params]).sum()
