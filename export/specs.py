"""One spec per exported network: the single source of its I/O names, dims, profile and sample inputs.

Export (ONNX names and dynamic axes), parity checks (sample inputs), the TensorRT build (profiles) and the
runtime's buffers (via the manifest written from these specs) all read the same object. The UNet networks' profiles
come from the rows a generation step sends them (:class:`lcmla_sdk.sampling.StepSpec`), evaluated over the requested
ranges.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lcmla_sdk.manifest import Profile, TensorInfo
from lcmla_sdk.pipeline import Personalizer
from lcmla_sdk.request import MODES
from lcmla_sdk.sampling import StepSpec
from lcmla_sdk.text import time_ids

TEXT_TOKENS = 77


@dataclass(frozen=True)
class ShapeRanges:
    """Requested ranges, each (min, opt, max): images per call, generated height/width in pixels and reference
    photos per identity."""

    batch: tuple[int, int, int] = (1, 1, 4)
    height: tuple[int, int, int] = (1024, 1024, 1024)
    width: tuple[int, int, int] = (1024, 1024, 1024)
    references: tuple[int, int, int] = (1, 1, 1)

    def __post_init__(self) -> None:
        for name in ("batch", "height", "width", "references"):
            low, opt, high = getattr(self, name)
            if not 1 <= low <= opt <= high:
                raise ValueError(f"{name}: range must satisfy 1 <= min <= opt <= max, got {low}:{opt}:{high}")

    def step_specs(self, which: int) -> list[StepSpec]:
        """Every kind of generation step (each mode, K/V on and off) at the min (0), opt (1) or max (2) images and
        references."""
        batch, references = self.batch[which], self.references[which]
        return [StepSpec(mode, batch, references, use_kv) for mode in MODES for use_kv in (False, True)]


@dataclass
class NetworkSpec:
    name: str
    module: nn.Module
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    profile: Profile
    # Largest allowed max|onnx - torch| / max|torch|, per precision of the exported graph.
    tolerance: dict[str, float]
    # How to draw each input for checks: "normal", "timestep", "unit", "token_ids:<vocab>", "time_ids".
    input_kinds: dict[str, str]
    # Latent sides must be multiples of this (every UNet downsampling halves them).
    latent_step: int = 1
    # For "time_ids" inputs, which name the generated size in pixels: the latent "height" and "width" times
    # vae_scale, or, in a graph without them (the K/V-encoder, given the generation's time ids), the default size.
    vae_scale: int | None = None
    default_size: int | None = None

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        tensors = self.inputs + self.outputs
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)} for t in tensors}

    def sample_inputs(self, sizes: dict[str, int], device: torch.device, seed: int = 0) -> list[torch.Tensor]:
        """Fresh random inputs of the right dtypes and shapes for the symbolic ``sizes``."""
        generator = torch.Generator().manual_seed(seed)
        return [self._draw(t, sizes, generator).to(device) for t in self.inputs]

    def pixel_size(self, sizes: dict[str, int]) -> tuple[int, int]:
        """The generated height and width in pixels that ``sizes`` stand for."""
        if "height" in sizes:
            return sizes["height"] * self.vae_scale, sizes["width"] * self.vae_scale
        return self.default_size, self.default_size

    def _draw(self, info: TensorInfo, sizes: dict[str, int], generator: torch.Generator) -> torch.Tensor:
        kind, shape, dtype = self.input_kinds[info.name], info.shape(sizes), getattr(torch, info.dtype)
        if kind == "normal":
            return torch.randn(shape, generator=generator).to(dtype)
        if kind == "timestep":
            return (torch.rand(shape, generator=generator) * 999).round().to(dtype)
        if kind == "unit":
            return torch.rand(shape, generator=generator).to(dtype)
        if kind.startswith("token_ids:"):
            return torch.randint(0, int(kind.split(":")[1]), shape, generator=generator, dtype=dtype)
        if kind == "time_ids":
            return time_ids(*self.pixel_size(sizes), shape[0], dtype, torch.device("cpu")).clone()
        raise ValueError(f"unknown input kind {kind!r}")


# --------------------------------------------------------------------------- flat-tensor wrappers
class _DenoiserGraph(nn.Module):
    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, latent, timestep, text, pooled_text, time_ids, image_tokens, adapter_scale, freeu, *kv):
        return self.denoiser(latent, timestep, text, pooled_text, time_ids, image_tokens, adapter_scale, kv, freeu)


class _VAEDecoderGraph(nn.Module):
    """Scaled latent -> image in [-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent / self.vae.config.scaling_factor).sample


class _VAEEncoderGraph(nn.Module):
    """Image in [-1, 1] -> unscaled latent mean and std (sampling happens outside, with the caller's generator)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image):
        dist = self.vae.encode(image).latent_dist
        return dist.mean, dist.std


class _TextEncoderGraph(nn.Module):
    """Token ids -> penultimate hidden states (and the projected pooled output for the second encoder)."""

    def __init__(self, encoder: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.encoder, self.pooled = encoder, pooled

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        return (out.hidden_states[-2], out[0]) if self.pooled else out.hidden_states[-2]


# --------------------------------------------------------------------------- specs
def _kv_levels(model: Personalizer) -> list[int]:
    """Downsampling level of each K/V layer (0 = latent resolution), from the stage it sits in."""
    last = len(model.unet.down_blocks) - 1

    def level(name: str) -> int:
        stage, _, rest = name.partition(".")
        if stage == "mid_block":
            return last
        index = int(rest.split(".")[0])
        return index if stage == "down_blocks" else last - index

    return [level(name) for name in model.kv_blocks]


def _kv_tensors(model: Personalizer, dtype: str) -> list[TensorInfo]:
    """K/V tensors of every layer; ``face_tokens_<level>`` counts one reference's tokens out of the K/V-encoder and
    all the references' of an image into a denoiser."""
    tensors = []
    for index, (name, level) in enumerate(zip(model.kv_blocks, _kv_levels(model))):
        width = model.unet.get_submodule(name).attn1.inner_dim
        for kind in ("k", "v"):
            tensors.append(TensorInfo(f"{kind}_{index:02d}", dtype, ("batch", f"face_tokens_{level}", width)))
    return tensors


def _face_token_sizes(model: Personalizer, references: int) -> dict[str, int]:
    """``face_tokens_<level>`` of the K/V of ``references`` reference latents joined on the token axis."""
    side = model.face_size // model.vae_scale
    return {f"face_tokens_{level}": references * (side >> level) ** 2 for level in set(_kv_levels(model))}


def _denoiser_calls(step: StepSpec) -> list[tuple[int, int]]:
    """``(rows, K/V token multiple)`` of each denoiser graph call of one step: the runtime runs the rows without K/V
    (given empty K/V) and those taking them as separate calls (:class:`lcmla_sdk.engines.runtime.GraphDenoiser`)."""
    plain = step.denoiser_rows - step.kv_rows
    return [(rows, multiple) for rows, multiple in ((plain, 0), (step.kv_rows, step.kv_token_multiple)) if rows]


def _profile(
    ranges: ShapeRanges, sizes_of: Callable[[StepSpec], list[dict[str, int]]], fixed: list[dict[str, int]]
) -> Profile:
    """Each size of the calls ``sizes_of`` gives for a step: its smallest over the steps at the ranges' min, its
    largest at opt (the call that costs most, for TensorRT to tune) and at max; plus ``fixed``'s (min, opt, max)."""

    def span(which: int, pick: Callable) -> dict[str, int]:
        calls = [sizes for step in ranges.step_specs(which) for sizes in sizes_of(step)]
        return {**{name: pick(call[name] for call in calls) for name in calls[0]}, **fixed[which]}

    return Profile(span(0, min), span(1, max), span(2, max))


def _unet_conditioning(model: Personalizer, dtype: str, latent_dims: tuple) -> list[TensorInfo]:
    cfg = model.unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return [
        TensorInfo("latent", dtype, ("batch", 4) + latent_dims),
        TensorInfo("timestep", "float32", ("batch",)),
        TensorInfo("text", dtype, ("batch", TEXT_TOKENS, cfg.cross_attention_dim)),
        TensorInfo("pooled_text", dtype, ("batch", pooled)),
        TensorInfo("time_ids", dtype, ("batch", 6)),
    ]


_UNET_KINDS = {"latent": "normal", "timestep": "timestep", "text": "normal", "pooled_text": "normal", "time_ids": "time_ids"}


def build_specs(model: Personalizer, ranges: ShapeRanges) -> dict[str, NetworkSpec]:
    """Specs of every network ``model`` has, for the requested shape ranges."""
    dtype = str(model.dtype).removeprefix("torch.")
    vae_dtype = str(model.vae.dtype).removeprefix("torch.")
    lat = [(h // model.vae_scale, w // model.vae_scale) for h, w in zip(ranges.height, ranges.width)]
    face_side = model.face_size // model.vae_scale
    latent_step = model.size_multiple // model.vae_scale
    # One profile for both denoiser graphs, spanning the calls of either mode.
    denoising = _profile(
        ranges,
        lambda step: [{"batch": rows, **_face_token_sizes(model, kv)} for rows, kv in _denoiser_calls(step)],
        [{"height": h, "width": w} for h, w in lat],
    )
    # Per step, or once per identity for a K/V cache; every call gives one reference's tokens per row.
    encoding = _profile(
        ranges,
        lambda step: [{"batch": rows} for rows in (step.encoder_rows, step.identity_encoder_rows) if rows],
        [_face_token_sizes(model, 1)] * 3,
    )
    # The photos of one identity; up to the images per call too, as earlier exports allowed.
    photos = Profile({"batch": 1}, {"batch": 1}, {"batch": max(ranges.batch[2], ranges.references[2])})
    # Prompts and negatives are encoded apart, from one row (the K/V-encoder's prompt) up to one per image; the
    # profile keeps room for both at once: the denoiser rows of a guided step without K/V.
    text_rows = [StepSpec("quality", images, 1, False).denoiser_rows for images in ranges.batch]
    time_ids_size = {"vae_scale": model.vae_scale, "default_size": model.default_size}
    kv = _kv_tensors(model, dtype)
    tokens = model.adapter.resampler.latents.shape[1]
    cross = model.unet.config.cross_attention_dim
    denoiser_inputs = _unet_conditioning(model, dtype, ("height", "width")) + [
        TensorInfo("image_tokens", dtype, ("batch", tokens, cross)),
        TensorInfo("adapter_scale", "float32", ("batch",)),
        TensorInfo("freeu", "float32", (2,)),  # FreeU's (b, s); (1, 1) is no FreeU
    ] + kv  # fmt: skip
    denoiser_kinds = {**_UNET_KINDS, "image_tokens": "normal", "adapter_scale": "unit", "freeu": "unit",
                      **{t.name: "normal" for t in kv}}  # fmt: skip
    eps = [TensorInfo("eps", dtype, ("batch", 4, "height", "width"))]
    unet_tolerance = {"float32": 1e-4, "float16": 3e-2}

    def denoiser_spec(name: str, denoiser: nn.Module) -> NetworkSpec:
        return NetworkSpec(name, _DenoiserGraph(denoiser), denoiser_inputs, eps, denoising, unet_tolerance,
                           denoiser_kinds, latent_step, **time_ids_size)  # fmt: skip

    image_size = model.clip_size
    specs = {
        "adapter": NetworkSpec(
            "adapter", model.adapter,
            [TensorInfo("pixel_values", dtype, ("batch", 3, image_size, image_size))],
            [TensorInfo("image_tokens", dtype, ("batch", tokens, cross)),
             TensorInfo("uncond_image_tokens", dtype, ("batch", tokens, cross))],
            photos, {"float32": 1e-4, "float16": 2e-2}, {"pixel_values": "normal"},
        ),
        "kv_encoder": NetworkSpec(
            "kv_encoder", model.kv_encoder,
            _unet_conditioning(model, dtype, (face_side, face_side)),
            [TensorInfo(t.name, t.dtype, t.dims) for t in kv],
            encoding, unet_tolerance, _UNET_KINDS, **time_ids_size,
        ),
        "denoiser": denoiser_spec("denoiser", model.denoiser),
        "vae_decoder": NetworkSpec(
            "vae_decoder", _VAEDecoderGraph(model.vae),
            [TensorInfo("latent", vae_dtype, ("batch", 4, "height", "width"))],
            [TensorInfo("image", vae_dtype, ("batch", 3, "image_height", "image_width"))],
            Profile(*({"batch": b, "height": h, "width": w, "image_height": h * model.vae_scale,
                       "image_width": w * model.vae_scale} for b, (h, w) in zip(ranges.batch, lat))),
            {"float32": 1e-4, "float16": 2e-2}, {"latent": "normal"}, latent_step,
        ),
        "vae_encoder": NetworkSpec(
            "vae_encoder", _VAEEncoderGraph(model.vae),
            [TensorInfo("image", vae_dtype, ("batch", 3, model.face_size, model.face_size))],
            [TensorInfo("latent_mean", vae_dtype, ("batch", 4, face_side, face_side)),
             TensorInfo("latent_std", vae_dtype, ("batch", 4, face_side, face_side))],
            photos, {"float32": 1e-4, "float16": 2e-2}, {"image": "normal"},
        ),
    }  # fmt: skip
    if model.lcm_denoiser is not None:
        specs["denoiser_lcm"] = denoiser_spec("denoiser_lcm", model.lcm_denoiser)
    text_profile = Profile({"batch": 1}, {"batch": text_rows[1]}, {"batch": text_rows[2]})
    for index, (name, encoder) in enumerate(zip(("text_encoder", "text_encoder_2"), model.text_encoders)):
        # Always fp32: transformers' fp16 CLIP text path traces into LayerNorms of mixed input types, which
        # onnxruntime and TensorRT reject; the text encoders run once per prompt, so this costs nothing per step.
        encoder = copy.deepcopy(encoder).float() if encoder.dtype != torch.float32 else encoder
        pooled = index == 1
        outputs = [TensorInfo("hidden_states", "float32", ("batch", TEXT_TOKENS, encoder.config.hidden_size))]
        if pooled:
            outputs.append(TensorInfo("pooled", "float32", ("batch", encoder.config.projection_dim)))
        specs[name] = NetworkSpec(
            name, _TextEncoderGraph(encoder, pooled),
            [TensorInfo("input_ids", "int64", ("batch", TEXT_TOKENS))], outputs, text_profile,
            {"float32": 1e-4}, {"input_ids": f"token_ids:{encoder.config.vocab_size}"},
        )  # fmt: skip
    return specs
