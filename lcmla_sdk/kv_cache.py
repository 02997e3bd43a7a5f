"""The K/V-encoder's output computed ahead of the sampling loop instead of inside every step.

Its input at a step depends only on the reference, its noise and the step's timestep, so every step's K/V can be
computed before the loop, several steps in one batched pass (:func:`encode_steps`):

* per identity (``kv_cache=True``): once per identity with its fixed reference noise, kept least recently used first
  out beyond a memory bound and reused by later calls (:func:`identity_kv`). A documented deviation from the
  authors, who noise the reference with each image's own initial noise (README);
* per call (:func:`call_kv`), with the authors' pairing, where one pass covers every step: a batch-1 pass leaves
  most of the GPU idle, so a batch of steps costs less than the steps one by one.

:func:`ahead_kv` picks between them and the K/V-encoder in every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .bounded_cache import BoundedCache
from .identity import Identity
from .noise import face_latents, fixed_face_noise
from .request import Request
from .sampling import StepInputs, StepSpec, encoder_values, flatten_kv, join_references
from .schedule import StepTable, noise_reference
from .transfer import device_tensor, to_device

KV_CACHE_BYTES = 16 * 2**30  # per Personalizer
AHEAD_ROWS = 4  # encoder rows of one pass ahead of the loop on a GPU (fast mode: 4 steps of one image)
Entry = tuple[torch.Tensor, tuple[tuple[int, int], ...]]  # (steps, rows, elements) flat K/V per step, and its layout


@dataclass(frozen=True)
class StepKV:
    """Every step's K/V, computed ahead: ``per_step`` ``(steps, rows, elements)`` flat (:func:`flatten_kv`) with its
    ``layout``; ``rows`` ``(G x B,)``: the row each denoiser row taking K/V reads (``None``: row i reads row i)."""

    per_step: torch.Tensor
    layout: tuple[tuple[int, int], ...]
    rows: torch.Tensor | None = None


class IdentityKVCache(BoundedCache[Entry]):
    def __init__(self, max_bytes: int = KV_CACHE_BYTES) -> None:
        super().__init__(max_bytes, lambda entry: entry[0].numel() * entry[0].element_size())


def cache_key(identity: Identity, request: Request, table: StepTable) -> tuple:
    """What an identity's cached K/V depend on besides the networks: the schedule, the size micro-conditioning and
    the negative prompt (the unconditional rows)."""
    negative = str(request.negative_prompt[0]) if request.negative_prompt else None
    return (identity.digest(), request.mode, tuple(table.host_timesteps), request.height, request.width, negative)


def encode_steps(encoder: Callable, table: StepTable, values: dict[str, torch.Tensor], references: int,
                 steps_per_pass: int, max_bytes: float = float("inf")) -> Entry:  # fmt: skip
    """The encoder's joined K/V at every step of ``table`` from the encoder rows of ``values`` (:func:`encoder_values`),
    ``steps_per_pass`` steps batched in each pass; refused up front with the size it would need beyond
    ``max_bytes``."""
    rows = values["face_latents"].shape[0]
    passes = []
    for start in range(0, table.steps, steps_per_pass):
        count = min(steps_per_pass, table.steps - start)
        faces = torch.cat([noise_reference(table.coefficients[start + i], values["face_latents"], values["face_noise"])
                           for i in range(count)])  # fmt: skip
        timesteps = table.timesteps[start : start + count].repeat_interleave(rows)
        text, pooled, time_ids = (values[name].repeat(count, *[1] * (values[name].dim() - 1))
                                  for name in ("encoder_text", "encoder_pooled", "encoder_time_ids"))  # fmt: skip
        flat, layout = flatten_kv(join_references(encoder(faces, timesteps, text, pooled, time_ids), count * rows // references))
        need = flat.numel() * flat.element_size() * table.steps / count
        if need > max_bytes:
            raise ValueError(f"kv_cache: this identity's K/V for {table.steps} steps need {need / 2**30:.1f} GiB, over "
                             f"the cache's {max_bytes / 2**30:.0f} GiB; use fewer steps or kv_cache=False")  # fmt: skip
        passes.append(flat.view(count, -1, flat.shape[1]))
    return torch.cat(passes), layout


def ahead_kv(encoder: Callable, cache: IdentityKVCache, request: Request, identities: list[Identity], spec: StepSpec,
             table: StepTable, inputs: StepInputs, scaling_factor: float,
             max_rows: int) -> tuple[StepKV | None, StepSpec]:  # fmt: skip
    """Where the K/V of a call that uses them come from: every step's computed ahead, cached per identity
    (``kv_cache``) or per call where one pass of at most ``max_rows`` encoder rows covers them, with ``spec`` given
    their layout; or ``None`` and ``spec`` as it is, for the K/V-encoder to run in every step. Per call only for a
    torch encoder: an exported one takes the batch sizes of its engine's profiles, which a pass of several steps may
    exceed."""
    kv = None
    if request.kv_cache:
        steps_per_pass = max(1, max_rows // spec.identity_encoder_rows)
        kv = identity_kv(encoder, cache, request, identities, spec, table, inputs, scaling_factor, steps_per_pass)
    elif ahead_pays(spec, table, max_rows) and isinstance(encoder, torch.nn.Module):
        kv = call_kv(encoder, spec, table, inputs)
    return (None, spec) if kv is None else (kv, replace(spec, kv_layout=kv.layout))


def ahead_pays(spec: StepSpec, table: StepTable, max_rows: int) -> bool:
    """Whether one encoder pass of at most ``max_rows`` rows covers every step of a call (:func:`call_kv`)."""
    return spec.use_kv and spec.kv_layout is None and 1 < table.steps and spec.encoder_rows * table.steps <= max_rows


def call_kv(encoder: Callable, spec: StepSpec, table: StepTable, inputs: StepInputs) -> StepKV:
    """This call's K/V for every step in one pass, from each image's own reference noise (the authors' pairing)."""
    per_step, layout = encode_steps(encoder, table, encoder_values(spec, inputs), spec.references, table.steps)
    return StepKV(per_step, layout)


def identity_kv(encoder: Callable, cache: IdentityKVCache, request: Request, identities: list[Identity],
                spec: StepSpec, table: StepTable, inputs: StepInputs, scaling_factor: float,
                steps_per_pass: int) -> StepKV:  # fmt: skip
    """The cached K/V of each distinct identity of the call's prompts side by side, ``(steps, G x identities,
    elements)``, computed on first use (:func:`compute_kv`)."""
    distinct: dict[str, int] = {}
    entries, rows = [], []
    for identity in identities:
        digest = identity.digest()
        if digest not in distinct:
            def compute(identity=identity):
                return compute_kv(encoder, identity, spec, table, inputs, scaling_factor, cache.max_bytes, steps_per_pass)

            distinct[digest] = len(entries)
            entries.append(cache.get(cache_key(identity, request, table), compute))
        rows += [distinct[digest]] * request.num_images
    kv = entries[0][0] if len(entries) == 1 else torch.stack([entry[0] for entry in entries], 2).flatten(1, 2)
    index = [group * len(entries) + row for group in range(spec.groups) for row in rows]
    return StepKV(kv, entries[0][1], device_tensor(index, kv.device))


def compute_kv(encoder: Callable, identity: Identity, spec: StepSpec, table: StepTable, inputs: StepInputs,
               scaling_factor: float, max_bytes: float, steps_per_pass: int) -> Entry:  # fmt: skip
    """One identity's K/V at every step of ``table``: G x references rows, from the identity's fixed reference noise
    and the first image's negative prompt and size."""
    device, dtype = inputs.latents.device, inputs.latents.dtype
    eps, noise = fixed_face_noise(identity)
    one = StepInputs(**{**vars(inputs), "face_latents": to_device(face_latents(identity, eps, scaling_factor), device, dtype),
                        "face_noise": to_device(noise, device, dtype), "neg_text": inputs.neg_text[:1],
                        "neg_pooled": inputs.neg_pooled[:1], "time_ids": inputs.time_ids[:1]})  # fmt: skip
    values = encoder_values(StepSpec(spec.mode, 1, spec.references, True), one)
    return encode_steps(encoder, table, values, spec.references, steps_per_pass, max_bytes)
