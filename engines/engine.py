"""Engine build and the one class that touches a TensorRT runtime, for either backend (:mod:`.backends`).

Written against TensorRT 10's public Python API, which TensorRT-RTX shares. The backend's module is imported only
when a build or a load is asked for, so everything else in lcmla works without it; :class:`TensorRTUnavailable`
says how to get it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lcmla_sdk.atomic import write_bytes
from lcmla_sdk.errors import ModelFilesError
from lcmla_sdk.integrity import sha256_json
from lcmla_sdk.manifest import DTYPES, NetworkEntry, TensorInfo

from .backends import EngineBackend

PRECISIONS = ("fp16", "fp32")
RUNTIME_CACHE = "runtime.cache"  # beside each engine: the kernels TensorRT-RTX compiled for it on this GPU


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    optimization_level: int = 3  # the builder's builder_optimization_level, 0 (fast build) .. 5 (slow, best)
    workspace_gib: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {PRECISIONS}")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level: must be 0..5, got {self.optimization_level}")


def engine_cache_key(entry: NetworkEntry, options: BuildOptions, record: dict[str, Any]) -> str:
    """Hash of everything the build depends on: graph bytes, profile shapes, options, and the backend's record
    (backend, version and target: the GPU for TensorRT, the compute capabilities for TensorRT-RTX)."""
    shapes = {which: entry.input_shapes(which) for which in ("min", "opt", "max")}
    return sha256_json([entry.onnx_sha256, shapes, options, record])


def tensor_io(trt, source) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """``{name: (kind, dtype, dims)}`` of a parsed network's or a deserialised engine's inputs and outputs, dims -1
    where dynamic."""
    names = {getattr(trt, dtype): dtype for dtype in DTYPES if hasattr(trt, dtype)}
    if hasattr(source, "num_io_tensors"):  # an engine
        found = {}
        for index in range(source.num_io_tensors):
            name = source.get_tensor_name(index)
            kind = "input" if source.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            found[name] = (kind, names.get(source.get_tensor_dtype(name)), tuple(source.get_tensor_shape(name)))
        return found
    tensors = [("input", source.get_input(i)) for i in range(source.num_inputs)]
    tensors += [("output", source.get_output(i)) for i in range(source.num_outputs)]
    return {t.name: (kind, names.get(t.dtype), tuple(t.shape)) for kind, t in tensors}


def check_io(found: dict[str, tuple[str, str, tuple[int, ...]]], entry: NetworkEntry, source: str) -> None:
    """The names, kinds, dtypes and dims of ``found`` must be the manifest's. A symbolic dim is dynamic (-1), or the
    builder's static size where the profile fixes it (the K/V-encoder's token counts, set by the face size)."""
    fixed = {d: size for d, size in entry.profile.min.items() if entry.profile.max.get(d) == size}

    def agrees(tensor: TensorInfo, kind: str) -> bool:
        got = found.get(tensor.name)
        if got is None or got[:2] != (kind, tensor.dtype) or len(got[2]) != len(tensor.dims):
            return False
        return all(size == (dim if isinstance(dim, int) else -1) or (isinstance(dim, str) and size == fixed.get(dim))
                   for dim, size in zip(tensor.dims, got[2]))  # fmt: skip

    listed = [(kind, t) for kind, tensors in (("input", entry.inputs), ("output", entry.outputs)) for t in tensors]
    problems = [f"{t.name}: manifest {kind} {t.dtype} {t.dims}, found {found.get(t.name, 'nothing')}"
                for kind, t in listed if not agrees(t, kind)]  # fmt: skip
    problems += [f"{name}: not in the manifest" for name in found if name not in {t.name for _, t in listed}]
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ModelFilesError(
            f"networks[{entry.name!r}]: {source} differs from the manifest: " + "; ".join(problems[:3]) + more
        )


def build_engine(backend: EngineBackend, folder: Path, entry: NetworkEntry, options: BuildOptions,
                 engine_path: Path) -> None:  # fmt: skip
    """Parse the entry's ONNX graph in ``folder``, check its I/O against the manifest, add the entry's optimisation
    profile and serialise an engine to ``engine_path``; ``backend`` sets precision, targets and caches."""
    onnx_path = folder / entry.onnx
    trt = backend.load_module()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(backend.network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{backend.label} could not parse {onnx_path}: {errors}")
    check_io(tensor_io(trt, network), entry, f"{onnx_path} as {backend.label} parsed it")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 1024**3))
    backend.configure(trt, network, config, options.precision, entry.outputs[0].dtype, folder)
    profile = builder.create_optimization_profile()
    low, opt, high = (entry.input_shapes(which) for which in ("min", "opt", "max"))
    for tensor in entry.inputs:
        profile.set_shape(tensor.name, low[tensor.name], opt[tensor.name], high[tensor.name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{backend.label} failed to build an engine from {onnx_path}")
    write_bytes(engine_path, bytes(serialized))
    backend.finish(config, folder)


class Engine:
    """Owns one deserialised engine: load (refusing one this GPU cannot run, or whose I/O is not the manifest's),
    activate, allocate static buffers, infer.

    Buffers are allocated once at the profile's maximum shapes; every call copies inputs into them and returns
    views of the output buffers, so their addresses never change (safe inside a captured CUDA graph).
    """

    def __init__(self, path: Path, entry: NetworkEntry, backend: EngineBackend) -> None:
        self.path, self.entry, self.backend = path, entry, backend
        self.engine = self.context = self.runtime_cache = None
        self.buffers: dict[str, torch.Tensor] = {}

    def load(self) -> None:
        trt = self.backend.load_module()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        data = self.path.read_bytes()
        self.backend.check_engine(trt, runtime, data, self.path)
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise RuntimeError(f"{self.backend.label} could not deserialise {self.path}")
        check_io(tensor_io(trt, self.engine), self.entry, f"engine {self.path}")
        for tensor in self.entry.inputs:
            profile = tuple(tuple(shape) for shape in self.engine.get_tensor_profile_shape(tensor.name, 0))
            expected = tuple(self.entry.input_shapes(which)[tensor.name] for which in ("min", "opt", "max"))
            if profile != expected:
                raise ModelFilesError(f"networks[{self.entry.name!r}]: engine {self.path} profile of {tensor.name!r} "
                                      f"is {profile}, the manifest's {expected}")  # fmt: skip

    def activate(self) -> None:
        self.context, self.runtime_cache = self.backend.create_context(self.engine, self.path.with_name(RUNTIME_CACHE))

    def save_runtime_cache(self) -> None:
        """Keep the kernels compiled so far (TensorRT-RTX) for the next process on this GPU."""
        if self.runtime_cache is not None:
            self.backend.save_cache(self.runtime_cache, self.path.with_name(RUNTIME_CACHE))

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
            raise RuntimeError(f"{self.backend.label} inference failed for {self.entry.name}")
        return outputs
