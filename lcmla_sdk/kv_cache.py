"""The per-identity K/V cache: the K/V-encoder's output for a schedule's timesteps, computed once per identity with
the identity's fixed reference noise, kept least recently used first out beyond a memory bound.

A documented deviation from the authors, who noise the reference with each image's own initial noise (README).
"""

from __future__ import annotations

import torch

from .bounded_cache import BoundedCache
from .identity import Identity
from .noise import face_latents, fixed_face_noise
from .request import Request
from .sampling import StepInputs, StepSpec, encoder_rows, flatten_kv, join_references
from .schedule import StepTable, noise_reference

KV_CACHE_BYTES = 16 * 2**30  # per Personalizer
Entry = tuple[torch.Tensor, tuple[tuple[int, int], ...]]  # (steps, G, elements) flat K/V per step, and its layout


class IdentityKVCache(BoundedCache[Entry]):
    def __init__(self, max_bytes: int = KV_CACHE_BYTES) -> None:
        super().__init__(max_bytes, lambda entry: entry[0].numel() * entry[0].element_size())


def cache_key(identity: Identity, request: Request, table: StepTable) -> tuple:
    """What an identity's cached K/V depend on besides the networks: the schedule, the size micro-conditioning and
    the negative prompt (the unconditional rows)."""
    negative = str(request.negative_prompt[0]) if request.negative_prompt else None
    return (identity.digest(), request.mode, tuple(table.host_timesteps), request.height, request.width, negative)


def compute_kv(
    encoder, identity: Identity, spec: StepSpec, table: StepTable, inputs: StepInputs, scaling_factor: float,
    max_bytes: int,
) -> Entry:  # fmt: skip
    """The encoder's joined K/V at every step of ``table`` (rows: G x references, from the identity's fixed reference
    noise and the first image's negative prompt and size), refused up front with the size it would need when one
    identity's K/V exceed ``max_bytes``."""
    refs, groups = spec.references, spec.groups
    to = {"device": inputs.latents.device, "dtype": inputs.latents.dtype}
    eps, noise = fixed_face_noise(identity)
    face = face_latents(identity, eps, scaling_factor).to(**to).repeat(groups, 1, 1, 1)
    face_noise = noise.to(**to).repeat(groups, 1, 1, 1)
    negatives = (inputs.neg_text[:1].expand(refs, -1, -1), inputs.neg_pooled[:1].expand(refs, -1))
    text, pooled = encoder_rows(inputs.encoder_prompt, negatives, groups)
    time_ids = inputs.time_ids[:1].expand(spec.identity_encoder_rows, -1)
    steps = []
    for index in range(table.steps):
        timestep = table.timesteps[index : index + 1].expand(face.shape[0])
        kv = encoder(noise_reference(table.coefficients[index], face, face_noise), timestep, text, pooled, time_ids)
        flat, layout = flatten_kv(join_references(kv, groups))
        need = flat.numel() * flat.element_size() * table.steps
        if need > max_bytes:
            raise ValueError(f"kv_cache: this identity's K/V for {table.steps} steps need {need / 2**30:.1f} GiB, over "
                             f"the cache's {max_bytes / 2**30:.0f} GiB; use fewer steps or kv_cache=False")  # fmt: skip
        steps.append(flat)
    return torch.stack(steps), layout
