"""The sampling loop: one step function, run eagerly or replayed from a CUDA graph over the same static buffers.

A step reads only tensors from a dict of buffers (latents, conditioning, the step's coefficients and noise) and writes
the next latents back into it, so the eager loop and the graph loop are the same code: the graph loop captures
:func:`run_step` once per :class:`StepSpec` and shape, then, for every step of every later call of that shape, copies
the step's values into the buffers and replays it.

Buffers (``B`` images, ``R`` references, ``G`` = 1 in fast mode and 2 (uncond, cond) in quality mode; every row
count is a :class:`StepSpec` property):

``latents`` (B, 4, h, w), ``previous`` (B, 4, h, w) fp32 (the last data prediction), ``coefficients`` (8,) and
``timestep`` (1,) (a :class:`~lcmla_sdk.schedule.StepTable` row), ``noise`` (B, 4, h, w) (LCM's injected noise);
denoiser rows (``denoiser_rows``: fast: B; quality: [uncond, cond] or, with K/V, [uncond, cond, uncond, cond] of B
rows each) ``text``, ``pooled``, ``time_ids``, ``image_tokens``, ``adapter_scale``, of which, with K/V, the last
G x B (``kv_rows``) take them, R x one reference's tokens each; ``guidance`` (3,) fp32;
K/V-encoder rows (``encoder_rows``: G x B x R) ``face_latents``, ``face_noise``, ``encoder_text``, ``encoder_pooled``,
``encoder_time_ids``; or, with a per-identity K/V cache (computed once from G x R encoder rows), ``kv`` (G, R x K/V
elements of all layers); with FreeU, ``freeu`` (2,) fp32.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .guidance import three_branch
from .schedule import StepTable, apply_step, noise_reference

log = logging.getLogger("lcmla")
_said: set[str] = set()


def say_once(message: str, level: int = logging.WARNING) -> None:
    """Log a notice the first time it comes up in this process."""
    if message not in _said:
        _said.add(message)
        log.log(level, message)


@dataclass(frozen=True)
class StepSpec:
    """What a step computes, besides tensor shapes: the branches, where the K/V come from, and so the rows the
    denoiser and the K/V-encoder receive in a generation call. The pipeline builds its buffers from it and the export
    derives their profiles from it (:func:`lcmla_sdk.export.specs.build_specs`)."""

    mode: str  # "fast": LCM denoiser, conditional branch; "quality": three-branch guidance
    batch: int  # images B
    references: int  # reference photos R of the identity
    use_kv: bool
    # (tokens, width) of each K/V tensor when they come from a per-identity cache; None: run the K/V-encoder.
    kv_layout: tuple[tuple[int, int], ...] | None = None

    @property
    def groups(self) -> int:
        """K/V-encoder row groups: the conditional one, plus the unconditional one under guidance."""
        return 1 if self.mode == "fast" else 2

    @property
    def denoiser_blocks(self) -> tuple[tuple[bool, bool], ...]:
        """The denoiser's rows in blocks of B, each ``(conditional, takes K/V)``: fast: [cond]; quality: [uncond,
        cond] without K/V, then, with K/V, [uncond, cond] again taking them (one pass gives all three branches)."""
        if self.mode == "fast":
            return ((True, self.use_kv),)
        plain = ((False, False), (True, False))
        return plain + ((False, True), (True, True)) if self.use_kv else plain

    @property
    def denoiser_rows(self) -> int:
        return len(self.denoiser_blocks) * self.batch

    @property
    def kv_rows(self) -> int:
        """Denoiser rows taking K/V: the last G x B (0 without K/V)."""
        return sum(takes_kv for _, takes_kv in self.denoiser_blocks) * self.batch

    @property
    def kv_token_multiple(self) -> int:
        """K/V tokens of a row taking them, in one reference's tokens: each image attends over all its references."""
        return self.references if self.use_kv else 0

    @property
    def encoder_rows(self) -> int:
        """K/V-encoder rows of a step that runs it: G x B x R (0 without K/V)."""
        return self.batch * self.identity_encoder_rows

    @property
    def identity_encoder_rows(self) -> int:
        """K/V-encoder rows of a per-identity K/V cache: G x R, computed once for every image (0 without K/V)."""
        return self.groups * self.references if self.use_kv else 0


@dataclass
class Networks:
    """The networks a step calls; torch modules or exported graphs with the same call signatures."""

    kv_encoder: Any
    denoiser: Any
    lcm_denoiser: Any
    adapter: Any

    def are_torch_modules(self) -> bool:
        """Whether every network given is a torch module (what a CUDA-graph capture can record)."""
        return all(isinstance(n, torch.nn.Module) for n in vars(self).values() if n is not None)


def join_references(kv: Sequence[torch.Tensor], rows: int) -> tuple[torch.Tensor, ...]:
    """``(rows x references, tokens, width)`` K/V -> ``(rows, references x tokens, width)``: each image attends over
    the K/V of all its references, reference after reference."""
    return tuple(x.reshape(rows, -1, x.shape[-1]) for x in kv)


def flatten_kv(kv: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    """Joined K/V ``(G, tokens_i, width_i)`` -> one ``(G, sum of tokens_i x width_i)`` tensor and its layout."""
    layout = tuple((x.shape[1], x.shape[2]) for x in kv)
    return torch.cat([x.reshape(x.shape[0], -1) for x in kv], dim=1), layout


def unflatten_kv(flat: torch.Tensor, layout: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """Views of a :func:`flatten_kv` tensor as the per-layer K/V (no copy)."""
    pieces = flat.split([tokens * width for tokens, width in layout], dim=1)
    return tuple(p.view(flat.shape[0], tokens, width) for p, (tokens, width) in zip(pieces, layout))


def _encoder_kv(networks: Networks, spec: StepSpec, buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """This step's K/V for the denoiser rows that take them: (G x B, R x tokens, width) per layer."""
    if spec.kv_layout is not None:
        cached = unflatten_kv(buffers["kv"], spec.kv_layout)  # (G, R x tokens, width): the same for every image
        batch = spec.batch
        return tuple(x[:, None].expand(x.shape[0], batch, *x.shape[1:]).reshape(-1, *x.shape[1:]) for x in cached)
    face = noise_reference(buffers["coefficients"], buffers["face_latents"], buffers["face_noise"])
    timestep = buffers["timestep"].expand(face.shape[0])
    kv = networks.kv_encoder(
        face, timestep, buffers["encoder_text"], buffers["encoder_pooled"], buffers["encoder_time_ids"]
    )
    return join_references(kv, spec.kv_rows)


def run_step(networks: Networks, spec: StepSpec, buffers: dict[str, torch.Tensor]) -> None:
    """One sampling step on ``buffers``, in place: only device-tensor work, so it can be captured in a CUDA graph."""
    latents = buffers["latents"]
    kv = _encoder_kv(networks, spec, buffers) if spec.use_kv else None
    if spec.mode == "fast":
        timestep = buffers["timestep"].expand(latents.shape[0])
        eps = networks.lcm_denoiser(
            latents, timestep, buffers["text"], buffers["pooled"], buffers["time_ids"], buffers["image_tokens"],
            buffers["adapter_scale"], kv, buffers.get("freeu"),
        )  # fmt: skip
    else:
        # One denoiser pass over all blocks; the last [uncond, cond] pair is the one with K/V when there are any.
        blocks = len(spec.denoiser_blocks)
        rows = latents.repeat(blocks, 1, 1, 1)
        out = networks.denoiser(
            rows, buffers["timestep"].expand(rows.shape[0]), buffers["text"], buffers["pooled"], buffers["time_ids"],
            buffers["image_tokens"], buffers["adapter_scale"], kv, buffers.get("freeu"),
        ).float().chunk(blocks)  # fmt: skip
        eps = three_branch(out[0], out[1], out[-2], out[-1], buffers["guidance"])
    new_latents, x0 = apply_step(buffers["coefficients"], latents, eps, buffers["previous"], buffers["noise"])
    latents.copy_(new_latents)
    buffers["previous"].copy_(x0)


def step_buffers(values: dict[str, torch.Tensor], table: StepTable, with_kv_cache: torch.Tensor | None) -> dict:
    """Fresh buffers shaped like ``values`` plus the per-step ones (zeros, so a warm-up step reads no garbage)."""
    latents = values["latents"]
    buffers = {name: torch.zeros_like(value) for name, value in values.items()}
    buffers["previous"] = torch.zeros_like(latents, dtype=torch.float32)
    buffers["noise"] = torch.zeros_like(latents)
    buffers["coefficients"] = torch.zeros_like(table.coefficients[0])
    buffers["timestep"] = torch.zeros_like(table.timesteps[:1])
    if with_kv_cache is not None:
        buffers["kv"] = torch.zeros_like(with_kv_cache[0])
    return buffers


class CapturedStep:
    """:func:`run_step` captured in a CUDA graph over its own static buffers."""

    def __init__(self, networks: Networks, spec: StepSpec, buffers: dict[str, torch.Tensor]) -> None:
        self.buffers = buffers
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: library handles, autotuning, lazy state
            for _ in range(2):
                run_step(networks, spec, buffers)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may keep the GPU busy (eager work) while this one captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            run_step(networks, spec, buffers)
        self.bytes = 0

    def __call__(self, networks: Networks, spec: StepSpec, buffers: dict[str, torch.Tensor]) -> None:
        self.graph.replay()


class StepGraphs:
    """Captured steps by shape key, least recently used first out beyond ``max_bytes`` of graph memory.

    One lock serialises the graph loop: its buffers are shared by every call of one shape.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self._entries: OrderedDict[tuple, CapturedStep] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple]:
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: tuple, capture: Callable[[], CapturedStep]) -> CapturedStep:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        before = torch.cuda.memory_reserved()
        entry = capture()
        entry.bytes = max(0, torch.cuda.memory_reserved() - before)
        self._entries[key] = entry
        while len(self._entries) > 1 and sum(e.bytes for e in self._entries.values()) > self.max_bytes:
            self._entries.popitem(last=False)
        return entry


def shape_key(spec: StepSpec, values: dict[str, torch.Tensor], extra: tuple = ()) -> tuple:
    """Everything a captured step depends on: the spec, every buffer's shape and dtype, and ``extra``."""
    return (spec, tuple((name, tuple(v.shape), v.dtype) for name, v in sorted(values.items())), *extra)


def sample(
    networks: Networks,
    spec: StepSpec,
    values: dict[str, torch.Tensor],
    table: StepTable,
    step_noise: torch.Tensor | None,
    kv_cache: torch.Tensor | None = None,
    graphs: StepGraphs | None = None,
    graph_key: tuple = (),
    callback: Callable[[int, int, torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """Run every step of ``table`` from ``values["latents"]``; return the final latents (a tensor of its own).

    ``step_noise``: ``(table.noise_steps, B, 4, h, w)``, drawn ahead from each image's generator. ``kv_cache``:
    ``(steps, G, ...)`` flat K/V per step (:func:`flatten_kv`). With ``graphs``, the step is captured once per
    ``graph_key`` and replayed; otherwise it runs eagerly on fresh buffers.
    """
    if graphs is None:
        buffers = step_buffers(values, table, kv_cache)
        return _loop(run_step, networks, spec, buffers, values, table, step_noise, kv_cache, callback)
    with graphs.lock:

        def capture() -> CapturedStep:
            return CapturedStep(networks, spec, step_buffers(values, table, kv_cache))

        step = graphs.get(graph_key, capture)
        return _loop(step, networks, spec, step.buffers, values, table, step_noise, kv_cache, callback)


def _loop(step, networks, spec, buffers, values, table, step_noise, kv_cache, callback) -> torch.Tensor:
    for name, value in values.items():
        buffers[name].copy_(value)
    buffers["previous"].zero_()
    for index in range(table.steps):
        buffers["coefficients"].copy_(table.coefficients[index])
        buffers["timestep"].copy_(table.timesteps[index : index + 1])
        if step_noise is not None and index < table.noise_steps:
            buffers["noise"].copy_(step_noise[index])
        else:
            buffers["noise"].zero_()
        if kv_cache is not None:
            buffers["kv"].copy_(kv_cache[index])
        step(networks, spec, buffers)
        if callback is not None:
            # A copy: the buffer is overwritten by the next step. Latents it returns are the next step's input.
            replaced = callback(index, table.host_timesteps[index], buffers["latents"].clone())
            if isinstance(replaced, torch.Tensor):
                if replaced.shape != buffers["latents"].shape:
                    raise ValueError(f"callback: returned latents of shape {tuple(replaced.shape)}, "
                                     f"expected {tuple(buffers['latents'].shape)}")  # fmt: skip
                buffers["latents"].copy_(replaced)
    return buffers["latents"].clone()
