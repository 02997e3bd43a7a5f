"""The two TensorRTs lcmla builds engines with; a backend object picks the module and does what differs between them.

- :class:`TensorRT` (``tensorrt``): engines are built on the GPU they will run on, weakly typed (the FP16 flag lets
  the builder pick fp16 kernels), with a timing cache shared by the builds.
- :class:`TensorRTRTX` (TensorRT for RTX, ``tensorrt_rtx_bindings``): TensorRT's API with strongly typed networks only
  (the graph's dtypes are the engine's), engines compiled ahead of time without a GPU for a list of compute
  capabilities (no timing cache: it would make the build look for a GPU), and kernels compiled just in time on the
  GPU at run time, kept in a runtime cache beside each engine. It runs on compute capability 7.5 (only when built for
  it), 8.0, 8.6, 8.9 and 12.x, not on Hopper (9.0).

The build (:func:`lcmla_sdk.engines.engine.build_engine`) and :class:`~lcmla_sdk.engines.engine.Engine` are shared
and call the hooks below; the manifest records the backend, its version and its target (:meth:`EngineBackend.record`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lcmla_sdk.atomic import write_bytes
from lcmla_sdk.errors import LcmlaError


class TensorRTUnavailable(RuntimeError):
    """The backend's Python module cannot be imported."""


class EngineMismatchError(LcmlaError, RuntimeError):
    """An engine folder built for another GPU, backend, version or model, or an engine the GPU cannot run."""


def current_gpu() -> tuple[str, str] | None:
    """Name and compute capability (``"8.9"``) of the current CUDA GPU, or ``None`` without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(), ".".join(map(str, torch.cuda.get_device_capability()))


def gpu_identity() -> dict[str, str]:
    """``{"gpu": name, "compute_capability": "9.0"}`` of the current CUDA GPU (what TensorRT engines are built for)."""
    gpu = current_gpu()
    if gpu is None:
        raise RuntimeError("no CUDA GPU found")
    return {"gpu": gpu[0], "compute_capability": gpu[1]}


class EngineBackend(ABC):
    """What one TensorRT does its own way; the hooks without a body here are TensorRT's defaults."""

    name: ClassVar[str]  # as the CLI, ``use_exported`` and the manifest name it
    label: ClassVar[str]
    module_name: ClassVar[str]
    install_hint: ClassVar[str]

    def load_module(self):
        try:
            return importlib.import_module(self.module_name)
        except ImportError as error:
            raise TensorRTUnavailable(self.install_hint) from error

    def record(self, module) -> dict[str, Any]:
        """What the manifest records of this backend and what its engines were built for (also in the cache key)."""
        return {"backend": self.name, "version": module.__version__, **self.target()}

    @abstractmethod
    def target(self) -> dict[str, Any]:
        """What the engines are built for."""

    @abstractmethod
    def refusals(self, recorded: dict[str, Any]) -> list[str]:
        """Why engines built for ``recorded`` (:meth:`record`'s target) cannot run here; empty when they can."""

    def network_flags(self, trt) -> int:
        return 0

    def configure(self, trt, network, config, precision: str, graph_dtype: str, folder: Path) -> None:
        """Precision and caches of one build (``precision``: the options'; ``graph_dtype``: the graph's outputs')."""

    def finish(self, config, folder: Path) -> None:
        """After a build: keep what the next build reuses."""

    def check_engine(self, trt, runtime, data: bytes, path: Path) -> None:
        """Refuse an engine this GPU cannot run before it is deserialised."""

    def create_context(self, engine, cache: Path) -> tuple[Any, Any]:
        """An execution context and the runtime cache it fills (``None`` for TensorRT), read from ``cache``."""
        return engine.create_execution_context(), None

    def save_cache(self, runtime_cache, cache: Path) -> None:
        """Keep what the runtime compiled in ``cache``."""


@dataclass(frozen=True)
class TensorRT(EngineBackend):
    name: ClassVar[str] = "tensorrt"
    label: ClassVar[str] = "TensorRT"
    module_name: ClassVar[str] = "tensorrt"
    install_hint: ClassVar[str] = (
        "TensorRT is not installed. On a machine with an NVIDIA GPU: pip install 'lcmla[tensorrt]' "
        "(NVIDIA's wheels; see https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html), "
        "or export the ONNX graphs only with --onnx-only."
    )

    def target(self) -> dict[str, Any]:
        return gpu_identity()  # TensorRT builds engines on the GPU they will run on

    def refusals(self, recorded: dict[str, Any]) -> list[str]:
        gpu = current_gpu()
        if gpu is None:
            return ["no CUDA GPU to run TensorRT engines on"]
        current = {"gpu": gpu[0], "compute_capability": gpu[1]}
        return [f"{key}: built for {recorded.get(key)}, running {value}" for key, value in current.items()
                if recorded.get(key) != value]  # fmt: skip

    def configure(self, trt, network, config, precision: str, graph_dtype: str, folder: Path) -> None:
        # Weakly typed: the FP16 flag lets the builder pick fp16 kernels; every normalisation layer's arithmetic stays
        # fp32 (its sums of squares overflow fp16). fp32 graphs (the SDXL VAE without the fp16 fix) build without it.
        if precision == "fp16" and graph_dtype == "float16":
            config.set_flag(trt.BuilderFlag.FP16)
            for index in range(network.num_layers):
                layer = network.get_layer(index)
                if layer.type == trt.LayerType.NORMALIZATION:
                    layer.__class__ = trt.INormalizationLayer  # the Python API's documented downcast
                    layer.compute_precision = trt.float32
        timing = folder / "timing.cache"
        cache = config.create_timing_cache(timing.read_bytes() if timing.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    def finish(self, config, folder: Path) -> None:
        write_bytes(folder / "timing.cache", bytes(config.get_timing_cache().serialize()))


# TensorRT-RTX's default targets (its engines then run on these, as a load on another GPU reports).
RTX_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0", "12.1")


@dataclass(frozen=True)
class TensorRTRTX(EngineBackend):
    """``compute_capabilities``: the GPUs the engines are compiled for (``"7.5"`` for Turing must be asked for)."""

    compute_capabilities: tuple[str, ...] = RTX_COMPUTE_CAPABILITIES
    name: ClassVar[str] = "tensorrt-rtx"
    label: ClassVar[str] = "TensorRT-RTX"
    module_name: ClassVar[str] = "tensorrt_rtx_bindings"
    install_hint: ClassVar[str] = (
        "TensorRT-RTX is not installed: pip install 'lcmla[tensorrt-rtx]' (NVIDIA's tensorrt-rtx-cu13-libs and "
        "-bindings wheels), or export the ONNX graphs only with --onnx-only."
    )

    def __post_init__(self) -> None:
        known = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
        unknown = [cc for cc in self.compute_capabilities if cc not in known]
        if unknown or not self.compute_capabilities:
            raise ValueError(f"compute_capabilities: {list(self.compute_capabilities)}; TensorRT-RTX targets {known}")

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> TensorRTRTX:
        return cls(tuple(recorded.get("compute_capabilities", RTX_COMPUTE_CAPABILITIES)))

    def target(self) -> dict[str, Any]:
        return {"compute_capabilities": list(self.compute_capabilities)}

    def refusals(self, recorded: dict[str, Any]) -> list[str]:
        gpu = current_gpu()
        if gpu is None:
            return ["no CUDA GPU to run TensorRT-RTX engines on"]
        supported = recorded.get("compute_capabilities", list(RTX_COMPUTE_CAPABILITIES))
        if gpu[1] in supported:
            return []
        return [self._unsupported(gpu, supported)]

    def network_flags(self, trt) -> int:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def configure(self, trt, network, config, precision: str, graph_dtype: str, folder: Path) -> None:
        graph_precision = "fp16" if graph_dtype == "float16" else "fp32"
        if precision != graph_precision:
            raise ValueError(f"precision: {precision} asked, but TensorRT-RTX networks are strongly typed and this "
                             f"graph is {graph_precision}; export the graphs in {precision} instead")  # fmt: skip
        keep_normalisation_fp32(trt, network)
        config.num_compute_capabilities = len(self.compute_capabilities)
        for index, capability in enumerate(self.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + capability.replace(".", "")), index)

    def check_engine(self, trt, runtime, data: bytes, path: Path) -> None:
        validity, diagnostics = runtime.get_engine_validity(data)
        if validity != trt.EngineValidity.INVALID:
            return
        gpu = current_gpu() or ("no CUDA GPU", "none")
        if diagnostics & int(trt.EngineInvalidityDiagnostics.UNSUPPORTED_CC):
            raise EngineMismatchError(f"{path}: {self._unsupported(gpu, self.compute_capabilities)}")
        reasons = [flag.lower().replace("_", " ") for flag, value in trt.EngineInvalidityDiagnostics.__members__.items()
                   if diagnostics & int(value)]  # fmt: skip
        raise EngineMismatchError(f"{path}: TensorRT-RTX {trt.__version__} cannot run this engine on {gpu[0]} "
                                  f"(compute capability {gpu[1]}): {', '.join(reasons) or 'invalid engine'}")  # fmt: skip

    def create_context(self, engine, cache: Path) -> tuple[Any, Any]:
        config = engine.create_runtime_config()
        runtime_cache = config.create_runtime_cache()
        if cache.exists():
            runtime_cache.deserialize(cache.read_bytes())  # refused (and left empty) if made on another GPU or version
        config.set_runtime_cache(runtime_cache)
        return engine.create_execution_context(config), runtime_cache

    def save_cache(self, runtime_cache, cache: Path) -> None:
        write_bytes(cache, bytes(runtime_cache.serialize()))

    def _unsupported(self, gpu: tuple[str, str], supported) -> str:
        return (f"TensorRT-RTX engines cannot run on {gpu[0]}, which has compute capability {gpu[1]}; they support "
                f"compute capabilities {' '.join(supported)} (on this GPU use the torch or tensorrt backend)")  # fmt: skip


def keep_normalisation_fp32(trt, network) -> None:
    """Cast the inputs of every fp16 normalisation layer to fp32 and its output back: in a strongly typed network a
    layer computes in its inputs' type, and fp16 sums of squares overflow."""
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        for slot in range(layer.num_inputs):
            tensor = layer.get_input(slot)
            if tensor is not None:
                consumers.setdefault(tensor.name, []).append((layer, slot))
    normalisations = [layer for layer in (network.get_layer(i) for i in range(network.num_layers))
                      if layer.type == trt.LayerType.NORMALIZATION and layer.get_output(0).dtype == trt.float16
                      and not layer.get_output(0).is_network_output]  # fmt: skip
    # Outputs first, then inputs: a normalisation reading another's output then casts that one's fp16 copy.
    for layer in normalisations:
        back = network.add_cast(layer.get_output(0), trt.float16).get_output(0)
        for consumer, slot in consumers.get(layer.get_output(0).name, []):
            consumer.set_input(slot, back)
    for layer in normalisations:
        for slot in range(layer.num_inputs):
            layer.set_input(slot, network.add_cast(layer.get_input(slot), trt.float32).get_output(0))


BACKENDS: dict[str, type[EngineBackend]] = {"tensorrt": TensorRT, "tensorrt-rtx": TensorRTRTX}


def backend_for(name: str, recorded: dict[str, Any] | None = None) -> EngineBackend:
    """The backend called ``name``; with a manifest's ``recorded`` target, the one its engines were built with."""
    if name not in BACKENDS:
        raise ValueError(f"backend: {name!r} is not one of {tuple(BACKENDS)}")
    if name == "tensorrt-rtx" and recorded is not None:
        return TensorRTRTX.from_record(recorded)
    return BACKENDS[name]()
