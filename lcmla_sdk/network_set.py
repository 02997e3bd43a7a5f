"""The inference networks of one model (:mod:`lcmla_sdk.networks`), built on first use from the shared peft UNet."""

from __future__ import annotations

import threading
from typing import Any

from diffusers import UNet2DConditionModel

from .compiling import AheadOfTime, CompiledNetwork
from .freeu import install_freeu
from .lora import KV_ENCODER_ADAPTER, LCM_ADAPTER, has_adapter, materialize
from .networks import Denoiser, ImageAdapter, KVEncoder
from .sampling import Networks, StepSpec
from .wiring import kv_block_names

NAMES = ("kv_encoder", "denoiser", "lcm_denoiser", "adapter")


class NetworkSet:
    """The K/V-encoder, the denoisers and the image adapter of one wired UNet.

    A UNet network is built on first use from the peft UNet, with its adapters merged (:func:`lora.materialize`);
    :meth:`replace` drops them, to be rebuilt after the UNet's weights changed, or installs others with the same
    call signatures (exported graphs). ``version`` counts the replacements: what is made from the networks (captured
    graphs) keys on it.
    """

    def __init__(self, unet: UNet2DConditionModel, adapter: ImageAdapter) -> None:
        self.unet = unet
        self.kv_blocks = kv_block_names(unet)
        self.has_lcm = has_adapter(unet, LCM_ADAPTER)
        self.version = 0
        self.compiled = False  # UNet networks built compiled whole (lcmla_sdk.compiling.CompiledNetwork)
        self.ahead: AheadOfTime | None = None  # their functions compiled ahead of time, if a folder has them
        self._lock = threading.Lock()
        self._built: dict[str, Any] = {"adapter": adapter}

    def __getitem__(self, name: str) -> Any:
        with self._lock:
            if name not in self._built:
                self._built[name] = self._build(name)
            return self._built[name]

    def _build(self, name: str) -> Any:
        if name == "kv_encoder":
            network = KVEncoder(materialize(self.unet, (KV_ENCODER_ADAPTER,)), len(self.kv_blocks))
        elif name == "lcm_denoiser" and not self.has_lcm:
            return None
        elif name in ("denoiser", "lcm_denoiser"):
            unet = materialize(self.unet, (LCM_ADAPTER,) if name == "lcm_denoiser" else ())
            install_freeu(unet)  # on the denoisers' own copies: the K/V-encoder's stage stays plain
            network = Denoiser(unet)
        else:
            raise KeyError(name)
        if self.compiled:
            return CompiledNetwork(network, name, self.ahead)
        return network

    def replace(self, **replacements: Any) -> None:
        """Drop the built UNet networks; ``replacements`` (``kv_encoder=...``) are installed instead."""
        unknown = set(replacements) - set(NAMES)
        if unknown:
            raise ValueError(f"networks: unknown {sorted(unknown)}")
        with self._lock:
            adapter = replacements.pop("adapter", self._built["adapter"])
            self._built = {"adapter": adapter, **replacements}
            self.version += 1

    def for_step(self, spec: StepSpec) -> Networks:
        """The networks a sampling step of ``spec`` calls."""
        return Networks(
            kv_encoder=self["kv_encoder"] if spec.use_kv and spec.kv_layout is None else None,
            denoiser=self["denoiser"] if spec.mode == "quality" else None,
            lcm_denoiser=self["lcm_denoiser"] if spec.mode == "fast" else None,
            adapter=None,
        )
