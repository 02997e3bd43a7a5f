"""The inference networks of one model (:mod:`lcmla_sdk.networks`), built on first use from the shared peft UNet, and
what is made from them: the captured sampling steps and the per-identity K/V."""

from __future__ import annotations

import threading
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from .compiling import AheadOfTime, CompiledNetwork
from .cuda_graphs import GraphCache
from .freeu import install_freeu
from .kv_cache import IdentityKVCache, StepKV
from .lora import KV_ENCODER_ADAPTER, LCM_ADAPTER, has_adapter, materialize
from .networks import Denoiser, ImageAdapter, KVEncoder
from .noise import StepNoise
from .sampling import Networks, StepSpec, sample
from .schedule import StepTable
from .wiring import kv_block_names

NAMES = ("kv_encoder", "denoiser", "lcm_denoiser", "adapter")
GRAPH_MEMORY_BYTES = 32 * 2**30  # captured sampling steps kept per model (least recently used out)


class NetworkSet:
    """The K/V-encoder, the denoisers and the image adapter of one wired UNet.

    A UNet network is built on first use from the peft UNet, with its adapters merged (:func:`lora.materialize`);
    :meth:`replace` drops them, to be rebuilt after the UNet's weights changed, or installs others with the same
    call signatures (exported graphs). ``version`` counts the replacements: the captured sampling steps
    (``step_graphs``) key on it, and they and the per-identity K/V (``kv_cache``) are dropped with the networks.
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
        self.step_graphs = GraphCache("the sampling step of this shape", GRAPH_MEMORY_BYTES)
        self.kv_cache = IdentityKVCache()

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
        """Drop the built UNet networks, the captured steps and the K/V cache; ``replacements`` (``kv_encoder=...``)
        are installed instead."""
        unknown = set(replacements) - set(NAMES)
        if unknown:
            raise ValueError(f"networks: unknown {sorted(unknown)}")
        with self._lock:
            adapter = replacements.pop("adapter", self._built["adapter"])
            self._built = {"adapter": adapter, **replacements}
            self.version += 1
        self.step_graphs.clear()
        self.kv_cache.clear()

    def compile(self, ahead: AheadOfTime | None = None) -> None:
        """Build the UNet networks compiled whole from now on (:class:`~lcmla_sdk.compiling.CompiledNetwork`), by
        ``ahead``'s functions where it has them; the networks already built are dropped, unless they are compiled
        already and no ``ahead`` is given."""
        if ahead is not None or not self.compiled:
            self.compiled, self.ahead = True, ahead
            self.replace()

    def for_step(self, spec: StepSpec) -> Networks:
        """The networks a sampling step of ``spec`` calls."""
        return Networks(
            kv_encoder=self["kv_encoder"] if spec.use_kv and spec.kv_layout is None else None,
            denoiser=self["denoiser"] if spec.mode == "quality" else None,
            lcm_denoiser=self["lcm_denoiser"] if spec.mode == "fast" else None,
            adapter=None,
        )

    def sample(self, spec: StepSpec, values: dict[str, torch.Tensor], table: StepTable, step_noise: StepNoise | None,
               kv: StepKV | None, graphed: bool, callback: Any) -> torch.Tensor:  # fmt: skip
        """:func:`lcmla_sdk.sampling.sample` over the networks of ``spec``, with ``kv`` computed ahead if given; where
        ``graphed``, its step is captured once per shape and kept in ``step_graphs``."""
        per_step = None if kv is None else kv.per_step
        # The K/V buffer's rows (one group per distinct identity, or per image) are part of a captured step's shape.
        key = (self.version, None if per_step is None else tuple(per_step.shape[1:]))
        graphs = self.step_graphs if graphed else None
        return sample(self.for_step(spec), spec, values, table, step_noise, per_step, graphs, key, callback)
