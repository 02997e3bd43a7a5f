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
``encoder_time_ids``; or, with K/V computed ahead of the loop (:mod:`lcmla_sdk.kv_cache`), ``kv`` (rows, R x K/V
elements of all layers): per call, G x B rows, or per identity, G x U rows for U distinct identities side by side,
and then ``kv_rows`` (G x B) the ``kv`` row of each denoiser row taking K/V; with FreeU, ``freeu`` (2,) fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .cuda_graphs import GraphCache, capture, say_once
from .guidance import three_branch
from .noise import StepNoise
from .schedule import StepTable, apply_step, noise_reference

Embeddings = tuple[torch.Tensor, torch.Tensor]  # (text, pooled)


@dataclass(frozen=True)
class StepSpec:
    """What a step computes, besides tensor shapes: the branches, where the K/V come from, and so the rows the
    denoiser and the K/V-encoder receive in a generation call. The pipeline builds its buffers from it and the export
    derives their profiles from it (:func:`lcmla_sdk.export.specs.build_specs`)."""

    mode: str  # "fast": LCM denoiser, conditional branch; "quality": three-branch guidance
    batch: int  # images B
    references: int  # reference photos R of the identity
    use_kv: bool
    # (tokens, width) of each K/V tensor when they are computed ahead of the loop (lcmla_sdk.kv_cache); None: the
    # K/V-encoder runs in the step.
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


@dataclass
class StepInputs:
    """What a generation call conditions its steps on, by name, one row per image (``B``) or per image and
    reference (``B x R``, image-major): :func:`step_values` lays it out in the rows a :class:`StepSpec` asks for."""

    latents: torch.Tensor  # (B, 4, h, w) the initial noise
    text: torch.Tensor  # (B, 77, d) the prompts
    pooled: torch.Tensor  # (B, d)
    neg_text: torch.Tensor  # the negative prompts (zeros where there are none)
    neg_pooled: torch.Tensor
    image_tokens: torch.Tensor  # (B, T, d) the identity's
    uncond_image_tokens: torch.Tensor
    adapter_scale: torch.Tensor  # (B,)
    time_ids: torch.Tensor  # (B, 6) SDXL micro-conditioning; the K/V-encoder's rows take their image's (the authors')
    guidance: torch.Tensor | None = None  # (3,) fp32: quality mode's weights
    freeu: torch.Tensor | None = None  # (2,) fp32: FreeU's (b, s); None: off
    # The K/V-encoder's inputs, for a step that runs it: its prompt (1 row) and the references (B x R rows).
    encoder_prompt: Embeddings | None = None
    face_latents: torch.Tensor | None = None
    face_noise: torch.Tensor | None = None


def step_values(spec: StepSpec, inputs: StepInputs, kv_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The values of a call's step buffers (named in this module's docstring), rows as ``spec`` lays them out;
    ``kv_rows``: the row of the K/V computed ahead that each denoiser row taking K/V reads (``None``: its own)."""
    blocks = spec.denoiser_blocks

    def rows(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return torch.cat([cond if conditional else uncond for conditional, _ in blocks])

    values = {
        "latents": inputs.latents,
        "text": rows(inputs.text, inputs.neg_text),
        "pooled": rows(inputs.pooled, inputs.neg_pooled),
        "time_ids": rows(inputs.time_ids, inputs.time_ids),
        "image_tokens": rows(inputs.image_tokens, inputs.uncond_image_tokens),
        "adapter_scale": rows(inputs.adapter_scale, inputs.adapter_scale),
    }
    optional = {"guidance": inputs.guidance, "freeu": inputs.freeu}
    values.update({name: value for name, value in optional.items() if value is not None})
    if spec.use_kv and spec.kv_layout is None:  # the K/V-encoder runs every step
        values.update(encoder_values(spec, inputs))
    if kv_rows is not None:
        values["kv_rows"] = kv_rows
    return {name: value.contiguous() for name, value in values.items()}


def encoder_values(spec: StepSpec, inputs: StepInputs) -> dict[str, torch.Tensor]:
    """The K/V-encoder's rows of a step (G x B x R): ``encoder_text``, ``encoder_pooled``, ``encoder_time_ids``,
    ``face_latents``, ``face_noise``."""
    refs, groups = spec.references, spec.groups
    negatives = (inputs.neg_text.repeat_interleave(refs, 0), inputs.neg_pooled.repeat_interleave(refs, 0))
    text, pooled = encoder_rows(inputs.encoder_prompt, negatives, groups)
    return {
        "encoder_text": text, "encoder_pooled": pooled,
        "encoder_time_ids": inputs.time_ids.repeat_interleave(refs, 0).repeat(groups, 1),
        "face_latents": inputs.face_latents.repeat(groups, 1, 1, 1),
        "face_noise": inputs.face_noise.repeat(groups, 1, 1, 1),
    }  # fmt: skip


def encoder_rows(
    prompt: tuple[torch.Tensor, torch.Tensor], negatives: tuple[torch.Tensor, torch.Tensor], groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K/V-encoder's ``(text, pooled)`` rows: its prompt for each row of the negatives, after those negatives
    when ``groups`` is 2 (quality mode's [uncond, cond])."""
    count = negatives[0].shape[0]
    text, pooled = prompt[0].expand(count, -1, -1), prompt[1].expand(count, -1)
    if groups == 1:
        return text, pooled
    return torch.cat([negatives[0], text]), torch.cat([negatives[1], pooled])


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
        ahead = unflatten_kv(buffers["kv"], spec.kv_layout)  # (G x identities, or G x B, R x tokens, width)
        return tuple(x.index_select(0, buffers["kv_rows"]) for x in ahead) if "kv_rows" in buffers else ahead
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


def step_buffers(values: dict[str, torch.Tensor], table: StepTable, kv_per_step: torch.Tensor | None) -> dict:
    """Fresh buffers shaped like ``values`` plus the per-step ones (zeros, so a warm-up step reads no garbage)."""
    latents = values["latents"]
    buffers = {name: torch.zeros_like(value) for name, value in values.items()}
    buffers["previous"] = torch.zeros_like(latents, dtype=torch.float32)
    buffers["noise"] = torch.zeros_like(latents)
    buffers["coefficients"] = torch.zeros_like(table.coefficients[0])
    buffers["timestep"] = torch.zeros_like(table.timesteps[:1])
    if kv_per_step is not None:
        buffers["kv"] = torch.zeros_like(kv_per_step[0])
    return buffers


def shape_key(spec: StepSpec, values: dict[str, torch.Tensor], extra: Hashable = ()) -> tuple:
    """Everything a captured step depends on: the spec, every buffer's shape and dtype, and ``extra``."""
    return (spec, tuple((name, tuple(v.shape), v.dtype) for name, v in sorted(values.items())), extra)


def sample(
    networks: Networks,
    spec: StepSpec,
    values: dict[str, torch.Tensor],
    table: StepTable,
    step_noise: StepNoise | None,
    kv_per_step: torch.Tensor | None = None,
    graphs: GraphCache | None = None,
    graph_key: Hashable = (),
    callback: Callable[[int, int, torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """Run every step of ``table`` from ``values["latents"]``; return the final latents (a tensor of its own).

    ``step_noise``: the noise of the first ``table.noise_steps`` steps, drawn as each step comes. ``kv_per_step``:
    ``(steps, rows, elements)`` flat K/V per step (:func:`flatten_kv`), computed ahead (:mod:`lcmla_sdk.kv_cache`).
    With ``graphs``, the step is captured once per shape and ``graph_key`` (what else it depends on) and replayed;
    otherwise, or where its capture fails, it runs eagerly on fresh buffers.
    """
    run = functools.partial(run_step, networks, spec)
    if graphs is not None and not networks.are_torch_modules():
        say_once("exported networks run their own engines: the sampling loop runs eagerly over them")
        graphs = None
    if graphs is not None:
        with graphs.lock:
            key = shape_key(spec, values, graph_key)
            step = graphs.get(key, lambda: capture(run, step_buffers(values, table, kv_per_step)))
            if step is not None:
                return _loop(lambda _: step.replay(), step.inputs, values, table, step_noise, kv_per_step, callback)
    return _loop(run, step_buffers(values, table, kv_per_step), values, table, step_noise, kv_per_step, callback)


def _loop(step, buffers, values, table, step_noise, kv_per_step, callback) -> torch.Tensor:
    for name, value in values.items():
        buffers[name].copy_(value)
    buffers["previous"].zero_()
    for index in range(table.steps):
        buffers["coefficients"].copy_(table.coefficients[index])
        buffers["timestep"].copy_(table.timesteps[index : index + 1])
        if step_noise is not None and index < table.noise_steps:
            buffers["noise"].copy_(step_noise(index))
        else:
            buffers["noise"].zero_()
        if kv_per_step is not None:
            buffers["kv"].copy_(kv_per_step[index])
        step(buffers)
        if callback is not None:
            # A copy: the buffer is overwritten by the next step. Latents it returns are the next step's input.
            replaced = callback(index, table.host_timesteps[index], buffers["latents"].clone())
            if isinstance(replaced, torch.Tensor):
                if replaced.shape != buffers["latents"].shape:
                    raise ValueError(f"callback: returned latents of shape {tuple(replaced.shape)}, "
                                     f"expected {tuple(buffers['latents'].shape)}")  # fmt: skip
                buffers["latents"].copy_(replaced)
    return buffers["latents"].clone()
