"""TensorRT: engine build and the one class that touches the TensorRT runtime.

Written against TensorRT 10's public Python API. ``tensorrt`` is imported only when a build or a load is asked
for, so everything else in lcmla works without it; :class:`TensorRTUnavailable` says how to get it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lcmla_sdk.atomic import write_bytes
from lcmla_sdk.errors import LcmlaError
from lcmla_sdk.integrity import sha256_json
from lcmla_sdk.manifest import NetworkEntry

INSTALL_HINT = (
    "TensorRT is not installed. On a machine with an NVIDIA GPU: pip install 'lcmla[tensorrt]' "
    "(NVIDIA's wheels; see https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html), "
    "or export the ONNX graphs only with --onnx-only."
)
PRECISIONS = ("fp16", "fp32")


class TensorRTUnavailable(RuntimeError):
    """``tensorrt`` cannot be imported."""


class EngineMismatchError(LcmlaError, RuntimeError):
    """An engine folder was built for another GPU, TensorRT version or model."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailable(INSTALL_HINT) from error
    return tensorrt


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    optimization_level: int = 3  # TensorRT's builder_optimization_level, 0 (fast build) .. 5 (slow, best)
    workspace_gib: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {PRECISIONS}")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level: must be 0..5, got {self.optimization_level}")


def gpu_identity() -> dict[str, Any]:
    name = torch.cuda.get_device_name()
    return {"gpu": name, "compute_capability": ".".join(map(str, torch.cuda.get_device_capability()))}


def engine_cache_key(entry: NetworkEntry, options: BuildOptions, tensorrt_version: str, gpu: dict[str, Any]) -> str:
    """Hash of everything the build depends on: graph bytes, profile shapes, options, TensorRT and GPU."""
    shapes = {which: entry.input_shapes(which) for which in ("min", "opt", "max")}
    return sha256_json([entry.onnx_sha256, shapes, options, tensorrt_version, gpu])


def build_engine(onnx_path: Path, entry: NetworkEntry, options: BuildOptions, engine_path: Path, timing_cache: Path):
    """Parse the ONNX graph, add the entry's optimisation profile and serialise an engine to ``engine_path``.

    fp16 builds keep every normalisation layer's arithmetic in fp32 (their sums of squares overflow fp16); graphs
    exported in fp32 (the SDXL VAE without the fp16 fix) are built without the fp16 flag.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 1024**3))
    graph_is_fp16 = entry.outputs[0].dtype == "float16"
    if options.precision == "fp16" and graph_is_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.__class__ = trt.INormalizationLayer  # the Python API's documented downcast
                layer.compute_precision = trt.float32
    profile = builder.create_optimization_profile()
    low, opt, high = (entry.input_shapes(which) for which in ("min", "opt", "max"))
    for tensor in entry.inputs:
        profile.set_shape(tensor.name, low[tensor.name], opt[tensor.name], high[tensor.name])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    write_bytes(engine_path, bytes(serialized))
    write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))


class Engine:
    """Owns one deserialised engine: load, activate, allocate static buffers, infer.

    Buffers are allocated once at the profile's maximum shapes; every call copies inputs into them and returns
    views of the output buffers, so their addresses never change (safe inside a captured CUDA graph).
    """

    def __init__(self, path: Path, entry: NetworkEntry) -> None:
        self.path, self.entry = path, entry
        self.engine = self.context = None
        self.buffers: dict[str, torch.Tensor] = {}

    def load(self) -> None:
        trt = import_tensorrt()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialise {self.path}")

    def activate(self) -> None:
        self.context = self.engine.create_execution_context()

    def allocate(self, device: torch.device) -> None:
        largest = self.entry.profile.max
        for tensor in self.entry.inputs + self.entry.outputs:
            self.buffers[tensor.name] = torch.empty(tensor.shape(largest), dtype=getattr(torch, tensor.dtype), device=device)

    def infer(self, inputs: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        for tensor in self.entry.inputs:
            value = inputs[tensor.name]
            view = self.buffers[tensor.name].view(-1)[: value.numel()].view(value.shape)
            view.copy_(value)
            self.context.set_input_shape(tensor.name, tuple(value.shape))
            self.context.set_tensor_address(tensor.name, view.data_ptr())
        outputs = {}
        for tensor in self.entry.outputs:
            shape = tuple(self.context.get_tensor_shape(tensor.name))
            view = self.buffers[tensor.name].view(-1)[: math.prod(shape)].view(shape)
            self.context.set_tensor_address(tensor.name, view.data_ptr())
            outputs[tensor.name] = view
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT inference failed for {self.entry.name}")
        return outputs
