"""Exported graphs as drop-in networks: the same call signatures as :mod:`lcmla_sdk.networks`.

The sampling loop calls ``kv_encoder``, ``denoiser``, ``lcm_denoiser`` and ``adapter`` without knowing what
runs them. Here they run exported graphs through a runner: :class:`EngineRunner` (TensorRT or TensorRT-RTX
engines) or :class:`OnnxRuntimeRunner` (onnxruntime on the CPU, which is how the export contract is verified without a GPU).
Everything (names, order, dtypes) comes from the folder's ``manifest.json``. :func:`use_exported` switches a model to
an export folder's networks: these graphs, or the functions compiled ahead of time (:mod:`.compiled`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lcmla_sdk.manifest import Manifest, NetworkEntry, check_graph_io

from .backends import BACKENDS as ENGINE_BACKENDS
from .backends import EngineBackend, EngineMismatchError, backend_for
from .compiled import load_compiled
from .engine import Engine

BACKENDS = (*ENGINE_BACKENDS, "onnxruntime")


class GraphRunner(Protocol):
    def infer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class EngineRunner:
    def __init__(self, folder: Path, entry: NetworkEntry, device: torch.device, backend: EngineBackend) -> None:
        self.engine = Engine(folder / entry.engine, entry, backend)
        self.engine.load()
        self.engine.activate()
        self.engine.allocate(device)
        self.stream = torch.cuda.current_stream(device)
        self.shapes_seen: set[tuple] = set()

    def infer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self.engine.infer(inputs, self.stream)
        shapes = tuple(tuple(value.shape) for value in inputs.values())
        # TensorRT-RTX compiles kernels for the shapes it meets: keep them after each new shape's first call (outside
        # a CUDA graph capture, whose calls were made eagerly before).
        if shapes not in self.shapes_seen and not torch.cuda.is_current_stream_capturing():
            self.shapes_seen.add(shapes)
            self.engine.save_runtime_cache()
        return outputs


class OnnxRuntimeRunner:
    def __init__(self, folder: Path, entry: NetworkEntry, device: torch.device) -> None:
        import onnxruntime

        self.entry, self.device = entry, device
        self.session = onnxruntime.InferenceSession(str(folder / entry.onnx), providers=["CPUExecutionProvider"])
        check_graph_io(entry, self.session, folder)

    def infer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {t.name: inputs[t.name].detach().cpu().numpy() for t in self.entry.inputs}
        values = self.session.run([t.name for t in self.entry.outputs], feed)
        return {t.name: torch.from_numpy(np.asarray(v)).to(self.device) for t, v in zip(self.entry.outputs, values)}


def check_compatible(folder: Path, manifest: Manifest, model_fingerprint: str, backend: EngineBackend | None) -> None:
    """Refuse a folder made for another model, backend or version, or whose engines this GPU cannot run, naming
    every mismatch in one line."""
    problems = []
    if manifest.model_fingerprint != model_fingerprint:
        problems.append(f"model fingerprint {manifest.model_fingerprint[:16]} != loaded model {model_fingerprint[:16]}")
    if backend is not None:
        module = backend.load_module()
        recorded = manifest.tensorrt
        built_with = None if recorded is None else recorded.get("backend", "tensorrt")  # older folders: TensorRT
        if recorded is None:
            problems.append(f"no {backend.label} engines (exported with --onnx-only)")
        elif built_with != backend.name:
            problems.append(f"engines built with {built_with}, not {backend.name}")
        else:
            if recorded.get("version") != module.__version__:
                problems.append(f"version: built for {recorded.get('version')}, running {module.__version__}")
            problems += backend.refusals(recorded)
    if problems:
        raise EngineMismatchError(f"{folder}: " + "; ".join(problems))


class _GraphNetwork:
    def __init__(self, runner: GraphRunner, entry: NetworkEntry, dtype: torch.dtype) -> None:
        self.runner, self.entry, self.dtype = runner, entry, dtype

    def _run(self, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        inputs = {t.name: v.to(getattr(torch, t.dtype)) for t, v in zip(self.entry.inputs, values)}
        outputs = self.runner.infer(inputs)
        # A copy of every output: TensorRT's are views of static buffers that the next call overwrites (the
        # guided step would otherwise see its first denoiser output replaced by its second).
        return [outputs[t.name].to(self.dtype, copy=True) for t in self.entry.outputs]


class GraphKVEncoder(_GraphNetwork):
    def __call__(self, latent, timestep, text, pooled_text, time_ids) -> tuple[torch.Tensor, ...]:
        return tuple(self._run([latent, timestep, text, pooled_text, time_ids]))


class GraphDenoiser(_GraphNetwork):
    def __call__(self, latent, timestep, text, pooled_text, time_ids, image_tokens=None, adapter_scale=1.0, kv=None,
                 freeu=None):  # fmt: skip
        batch = latent.shape[0]
        if kv is not None and kv[0].shape[0] < batch:
            # K/V for the last rows only (the torch Denoiser's contract): the graph takes K/V for every row, so run
            # the rows without K/V and the rows with them as two calls.
            plain = batch - kv[0].shape[0]
            scale = torch.as_tensor(adapter_scale, dtype=torch.float32, device=latent.device).reshape(-1).expand(batch)
            parts = [(slice(0, plain), None), (slice(plain, batch), kv)]
            return torch.cat([
                self(latent[rows], timestep[rows], text[rows], pooled_text[rows], time_ids[rows],
                     None if image_tokens is None else image_tokens[rows], scale[rows], part_kv, freeu)
                for rows, part_kv in parts
            ])  # fmt: skip
        tokens_info, kv_info = self.entry.inputs[5], self.entry.inputs[8:]
        if image_tokens is None:  # zero scale over any tokens is exactly "no IP-Adapter"
            image_tokens = torch.zeros(batch, *tokens_info.dims[1:], device=latent.device)
            adapter_scale = 0.0
        scale = torch.as_tensor(adapter_scale, dtype=torch.float32, device=latent.device).reshape(-1).expand(batch)
        if freeu is None:  # b = s = 1 is exactly "no FreeU"
            freeu = torch.ones(2, device=latent.device)
        if kv is None:  # zero appended tokens is plain self-attention
            kv = [torch.zeros(batch, 0, t.dims[2], device=latent.device) for t in kv_info]
        return self._run([latent, timestep, text, pooled_text, time_ids, image_tokens, scale, freeu, *kv])[0]


class GraphAdapter(_GraphNetwork):
    def __call__(self, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        cond, uncond = self._run([pixel_values])
        return cond, uncond


_NETWORK_CLASSES = {"kv_encoder": GraphKVEncoder, "denoiser": GraphDenoiser, "denoiser_lcm": GraphDenoiser,
                    "adapter": GraphAdapter}  # fmt: skip
# Personalizer attribute each exported network replaces.
ATTRIBUTES = {"kv_encoder": "kv_encoder", "denoiser": "denoiser", "denoiser_lcm": "lcm_denoiser", "adapter": "adapter"}


def load_networks(folder: str | Path, model_fingerprint: str, backend: str, device: torch.device, dtype: torch.dtype,
                  verify: bool = True):  # fmt: skip
    """``{personalizer attribute: network}`` for every exported network the sampling loop calls (``verify``: check
    the hashes of the files the backend loads first, :meth:`Manifest.verify`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {BACKENDS}")
    folder = Path(folder)
    manifest = Manifest.load(folder)
    engines = None if backend == "onnxruntime" else backend_for(backend, manifest.tensorrt)
    check_compatible(folder, manifest, model_fingerprint, engines)
    if verify:
        manifest.verify(folder, backend)
    runner_class = OnnxRuntimeRunner if engines is None else partial(EngineRunner, backend=engines)
    networks = {}
    for name, network_class in _NETWORK_CLASSES.items():
        if name in manifest.networks:
            entry = manifest.networks[name]
            networks[ATTRIBUTES[name]] = network_class(runner_class(folder, entry, device), entry, dtype)
    return networks


def use_exported(model: Any, folder: str | Path, backend: str, verify: bool = True) -> None:
    """Run ``model``'s networks from an export folder, as ``Personalizer.use_exported`` describes: ``"torch"``: its
    functions compiled ahead of time (:func:`.compiled.load_compiled`); else its exported graphs
    (:func:`load_networks`), installed by ``model.rebuild_networks``."""
    if backend == "torch":
        load_compiled(model, folder, verify)
        return
    model.rebuild_networks(**load_networks(folder, model.fingerprint, backend, model.device, model.dtype, verify))
