"""``Personalizer``: one face photo + a prompt -> new images of that person (LCM-Lookahead on SDXL)."""

from __future__ import annotations

import logging
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderTiny, DPMSolverMultistepScheduler, LCMScheduler

from . import model_dir, validation
from .attention import install_lookahead_processors
from .errors import InvalidImageError, ModelFilesError
from .faces import ON_MULTIPLE, FaceAnalyzer, align_face
from .guidance import DEFAULT_GUIDANCE, Guidance
from .identity import Identity
from .images import FaceInput, clip_pixels, load_rgb, pixel_sha256, to_pil, vae_pixels
from .lora import KV_ENCODER_ADAPTER, LCM_ADAPTER, add_kv_encoder_lora, add_random_lcm_lora, has_adapter, materialize
from .manifest import sha256_json
from .networks import Denoiser, ImageAdapter, KVEncoder
from .presets import PRESETS, Components, build_random_components, preset_config
from .sampling import (
    Networks, StepGraphs, StepSpec, flatten_kv, join_references, sample, say_once, shape_key,
)  # fmt: skip
from .schedule import StepTable, build_table, noise_reference
from .text import encode_prompts, time_ids

MODES = {"quality": 50, "fast": 4}  # mode -> default number of steps
OUTPUTS = ("pil", "np", "pt", "latent")
CROPS = ("none", "face")
VAES = ("full", "tiny")
FACE_NOISES = ("paired", "fixed")
# Seed of the reference-face noise when it is fixed per identity (face_noise="fixed", and the K/V cache).
FIXED_FACE_NOISE_SEED = 0
GRAPH_MEMORY_BYTES = 32 * 2**30  # captured sampling steps kept per Personalizer (least recently used out)
KV_CACHE_BYTES = 16 * 2**30  # per-identity K/V kept per Personalizer (least recently used out)
StepCallback = Callable[[int, int, torch.Tensor], Any]
FaceEncoding = Identity  # the name of the first release


@dataclass
class _Request:
    """Validated, normalised arguments of one ``generate`` call."""

    prompts: list[str]
    negative_prompts: list[str] | None
    seeds: list[int]
    mode: str
    steps: int
    guidance: Guidance
    height: int
    width: int
    use_kv: bool
    adapter_scale: float
    kv_cache: bool
    face_noise: str
    vae: str
    output: str


@dataclass
class _Noise:
    """Everything random in one generation, drawn ahead from each image's own generator."""

    latents: torch.Tensor  # (B, 4, h, w): the initial latents
    face_latents: torch.Tensor  # (B x R, 4, fh, fw): each image's sample of its reference latents, scaled
    face_noise: torch.Tensor  # (B x R, 4, fh, fw): what noises them at every step
    steps: torch.Tensor | None  # (noise_steps, B, 4, h, w): the scheduler's injected noise (LCM)


def default_device_and_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """fp16 on a GPU, fp32 on the CPU, unless told otherwise."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype if dtype is not None else (torch.float16 if device.type == "cuda" else torch.float32)


class Personalizer:
    """Encoder-based face personalization with LCM-Lookahead's KV-encoder, denoiser and image adapter.

    The sampling loop calls the networks through their tensor interfaces (:mod:`lcmla_sdk.networks`):
    ``self.kv_encoder``, ``self.denoiser`` / ``self.lcm_denoiser`` and ``self.adapter``. The UNet networks are built
    on first use from the peft UNet ``self.unet`` (each with its adapters merged, :func:`lcmla_sdk.lora.materialize`);
    after changing ``self.unet``'s weights, call :meth:`rebuild_networks`.

    On a CUDA device the sampling step is captured in a CUDA graph per shape and replayed (``cuda_graphs=False``
    runs it eagerly); concurrent calls are safe: the graph loop holds a lock for the loop only.
    """

    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        fingerprint: str | None = None,
        faces: str | Path | None = None,
        source: model_dir.ModelLayout | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        config = components.config
        self.source = source  # the model directory the weights were loaded from (None for presets)
        self.config = config
        self.components = components
        # Identifies the weights an Identity (or an exported engine) was made with.
        self.fingerprint: str = fingerprint or sha256_json({"config": config})
        self.faces_dir = Path(faces).expanduser() if faces is not None else None
        self._face_analyzer: FaceAnalyzer | None = None
        self.device, self.dtype = device, dtype
        self.encoder_prompt: str = config["pipeline"]["encoder_prompt"]
        self.face_size: int = config["pipeline"]["face_size"]

        unet = components.unet
        self.kv_blocks = install_lookahead_processors(unet)
        if not has_adapter(unet, KV_ENCODER_ADAPTER):
            add_kv_encoder_lora(unet, self.kv_blocks, config["kv_encoder"]["lora_rank"], config["kv_encoder"].get("kv_lora_rank"))
        self.unet = _place(unet, device, dtype)
        self.has_lcm = has_adapter(unet, LCM_ADAPTER)

        self.tokenizers = (components.tokenizer, components.tokenizer_2)
        self.text_encoders = (_place(components.text_encoder, device, dtype), _place(components.text_encoder_2, device, dtype))
        # The stock SDXL VAE overflows in fp16: keep it in fp32 when its config asks for upcasting.
        vae_dtype = torch.float32 if components.vae.config.force_upcast else dtype
        self.vae = _place(components.vae, device, vae_dtype)
        self.tiny_vae = _place(components.tiny_vae, device, dtype) if components.tiny_vae is not None else None
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # Latent sides must survive every UNet downsampling.
        self.size_multiple = self.vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)
        self.default_size = unet.config.sample_size * self.vae_scale
        self.clip_size: int = components.image_encoder.config.image_size

        self.cuda_graphs = cuda_graphs
        self._lock = threading.Lock()  # guards the lazily built networks and the K/V cache
        self._networks: dict[str, Any] = {"adapter": _place(ImageAdapter(components.image_encoder, components.resampler), device, dtype)}
        self._networks_version = 0
        self._graphs = StepGraphs(GRAPH_MEMORY_BYTES)
        self._uncapturable: set[tuple] = set()
        self._kv_cache: OrderedDict[tuple, tuple[torch.Tensor, tuple]] = OrderedDict()
        self._encoder_prompt: tuple[torch.Tensor, torch.Tensor] | None = None
        self._vae_decode: Callable[[torch.Tensor], torch.Tensor] = lambda z: self.vae.decode(z).sample

    # ------------------------------------------------------------------ networks
    def _network(self, name: str):
        with self._lock:
            if name not in self._networks:
                self._networks[name] = self._build_network(name)
            return self._networks[name]

    def _build_network(self, name: str):
        if name == "kv_encoder":
            return KVEncoder(materialize(self.unet, (KV_ENCODER_ADAPTER,)), len(self.kv_blocks))
        if name == "denoiser":
            return Denoiser(materialize(self.unet, ()))
        if name == "lcm_denoiser":
            return Denoiser(materialize(self.unet, (LCM_ADAPTER,))) if self.has_lcm else None
        raise KeyError(name)

    kv_encoder = property(lambda self: self._network("kv_encoder"), doc="The K/V-encoder (kv_encoder LoRA merged).")
    denoiser = property(lambda self: self._network("denoiser"), doc="The authors' decoder: no adapter.")
    lcm_denoiser = property(lambda self: self._network("lcm_denoiser"), doc="The denoiser with the LCM-LoRA merged.")
    adapter = property(lambda self: self._network("adapter"), doc="CLIP vision tower + IP-Adapter resampler.")

    def rebuild_networks(self, **replacements: Any) -> None:
        """Drop the built networks (they are rebuilt from ``self.unet`` on next use), captured graphs and K/V caches;
        ``replacements`` (``kv_encoder=...``) install networks with the same call signatures instead."""
        with self._lock:
            unknown = set(replacements) - {"kv_encoder", "denoiser", "lcm_denoiser", "adapter"}
            if unknown:
                raise ValueError(f"networks: unknown {sorted(unknown)}")
            adapter = replacements.pop("adapter", self._networks["adapter"])
            self._networks = {"adapter": adapter, **replacements}
            self._networks_version += 1
            self._graphs.clear()
            self._uncapturable.clear()
            self._kv_cache.clear()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        faces: str | Path | None = None,
        tiny_vae: str | Path | None = None,
        cuda_graphs: bool = True,
        verify: bool = True,
    ) -> Personalizer:
        """Load an lcmla model directory (see :mod:`lcmla_sdk.model_dir`) or an embedded preset.

        A directory is validated (files, keys, shapes, dtypes) before any weight is read; nothing is downloaded.
        ``verify``: hash every file it records in ``lcmla.json`` and refuse one that changed (hashes are cached by
        file, size and mtime, so a large directory is hashed once); ``verify=False`` skips the hashing.
        ``faces`` overrides the directory's face pack. ``tiny_vae``: a local diffusers ``AutoencoderTiny`` folder
        (TAESD-XL) for ``generate(..., vae="tiny")``. Presets (``"tiny"``, ``"sdxl"``) have seeded random weights,
        drawn directly on ``device``: ``tiny`` makes noise, not faces; ``sdxl`` is the full architecture for export
        and benchmarks.
        """
        validation.loading(name, device, dtype, seed, faces, tiny_vae, cuda_graphs, verify)
        device, dtype = default_device_and_dtype(device, dtype)
        if str(name) in PRESETS:
            model = cls.from_config(preset_config(str(name)), device, dtype, seed, str(name), faces, cuda_graphs)
        else:
            if not model_dir.is_model_dir(name):
                raise ModelFilesError(f"name: {name!r} is neither a model directory nor an embedded preset {PRESETS}")
            layout = model_dir.validate(name, verify)
            if faces is None and "faces" in layout.components:
                faces = layout.components["faces"].path
            components = model_dir.load(layout, dtype)
            model = cls(components, device, dtype, layout.fingerprint(), faces, layout, cuda_graphs)
        if tiny_vae is not None:
            model.tiny_vae = _place(_load_tiny_vae(tiny_vae), device, dtype)
        return model

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        label: str = "custom",
        faces: str | Path | None = None,
        cuda_graphs: bool = True,
    ) -> Personalizer:
        """Random weights for an architecture given as constructor arguments (the presets' JSON format).

        Weights are drawn directly on ``device`` in ``dtype`` (no fp32 copy, no host-to-device transfer), so the
        same config, seed, dtype and device kind give the same weights on every run of one machine (the CPU's and a
        GPU's random streams differ, so the device kind is part of the fingerprint).
        """
        device, dtype = default_device_and_dtype(device, dtype)
        recipe = {"preset": label, "seed": seed, "dtype": str(dtype), "config": config}
        if device.type != "cpu":
            recipe["drawn_on"] = device.type
        components = _randomised_preset(config, seed, dtype, device)
        return cls(components, device, dtype, sha256_json(recipe), faces, cuda_graphs=cuda_graphs)

    def use_exported(self, folder: str | Path, backend: str = "tensorrt", verify: bool = True) -> None:
        """Run the KV-encoder, denoisers and adapter from an export folder (``lcmla export``) instead of PyTorch.

        ``backend`` is ``"tensorrt"`` (engines, GPU) or ``"onnxruntime"`` (ONNX graphs, CPU). The folder's manifest
        must have been made for this model (its fingerprint) and, for TensorRT, this GPU and TensorRT version.
        The sampling loop then runs eagerly over them (TensorRT engines are graph-free already). ``verify``: check the
        sha256 of every file the backend loads against the manifest first (cached like model directories').
        """
        from .engines.runtime import load_networks

        self.rebuild_networks(**load_networks(folder, self.fingerprint, backend, self.device, self.dtype, verify))

    def save_pretrained(self, path: str | Path, link_frozen: bool = False) -> Path:
        """Write this model as an lcmla model directory (safetensors + ``lcmla.json``), loadable by
        :meth:`from_pretrained`.

        ``link_frozen=True`` (training checkpoints): for a model loaded from a directory, the components training
        never changes (SDXL base, image encoder, LCM-LoRA, VAE override, face pack) are named where they are in that
        directory instead of copied (a full-size model part of about 2 GB instead of 11). Only for weights left as they
        were loaded; the directory then depends on that one staying where it is.
        """
        model_dir.save(self.components, self.faces_dir, path, linked=self.source if link_frozen else None)
        return Path(path)

    @property
    def face_analyzer(self) -> FaceAnalyzer | None:
        """insightface detection + ArcFace over the face pack, started on first use; ``None`` without a pack."""
        if self._face_analyzer is None and self.faces_dir is not None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else None
            self._face_analyzer = FaceAnalyzer(self.faces_dir, providers=providers)
        return self._face_analyzer

    # ------------------------------------------------------------------ steps of a generation
    def check_inputs(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None,
        num_images: int,
        seed: int | Sequence[int] | None,
        mode: str,
        steps: int | None,
        guidance: Sequence[float],
        height: int | None,
        width: int | None,
        use_kv: bool,
        adapter_scale: float,
        output: str,
        callback: StepCallback | None,
        kv_cache: bool = False,
        face_noise: str | None = None,
        vae: str = "full",
    ) -> _Request:
        # Types and ranges: lcmla_sdk.validation (its docstring states every range and the memory budget).
        prompts = validation.strings(prompt, "prompt")
        negatives = None
        if negative_prompt is not None:
            negatives = validation.strings(negative_prompt, "negative_prompt")
            negatives = negatives * len(prompts) if isinstance(negative_prompt, str) else negatives
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")
        num_images = validation.integer(num_images, "num_images", 1)
        batch = len(prompts) * num_images
        mode = validation.choice(mode, "mode", tuple(MODES))
        if mode == "fast" and not self.has_lcm:
            raise ValueError("mode: 'fast' needs an LCM-LoRA, and this model has none")
        steps = validation.steps(steps, mode, MODES[mode])
        guidance = validation.guidance(guidance)
        height = validation.image_side(height, "height", self.default_size, self.size_multiple)
        width = validation.image_side(width, "width", self.default_size, self.size_multiple)
        use_kv = validation.flag(use_kv, "use_kv")
        adapter_scale = validation.number(adapter_scale, "adapter_scale", 0.0, validation.MAX_WEIGHT)
        output = validation.choice(output, "output", OUTPUTS)
        validation.callback(callback)
        kv_cache = validation.flag(kv_cache, "kv_cache")
        if kv_cache and not use_kv:
            raise ValueError("kv_cache: caches the K/V-encoder's output, so it needs use_kv=True")
        if kv_cache and len(set(negatives or [None])) > 1:
            raise ValueError("kv_cache: the cached unconditional K/V need one negative prompt for every image")
        face_noise = ("fixed" if kv_cache else "paired") if face_noise is None else face_noise
        if face_noise not in FACE_NOISES:
            raise ValueError(f"face_noise: {face_noise!r} is not one of {FACE_NOISES}")
        if kv_cache and face_noise != "fixed":
            raise ValueError("face_noise: the K/V cache is computed with the identity's fixed noise; use 'fixed'")
        if vae not in VAES:
            raise ValueError(f"vae: {vae!r} is not one of {VAES}")
        if vae == "tiny" and self.tiny_vae is None:
            raise ValueError("vae: 'tiny' needs a tiny VAE: from_pretrained(..., tiny_vae=DIR) with a local TAESD-XL folder")
        validation.check_memory(
            validation.generation_bytes(self, batch, height, width, mode, use_kv), self.device,
            f"num_images/height/width ({batch} images of {height}x{width}, {mode} mode)",
            "generate fewer or smaller images per call",
        )  # fmt: skip
        seeds = validation.seeds(seed, batch) or [random.SystemRandom().randrange(2**32) for _ in range(batch)]
        return _Request(
            prompts, negatives, seeds, mode, steps, Guidance(*map(float, guidance)), height, width, use_kv,
            float(adapter_scale), kv_cache, face_noise, vae, output,
        )  # fmt: skip

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None):
        """``(text, pooled)`` for the prompts and for the negatives (zeros for an absent negative prompt)."""
        text, pooled = encode_prompts(prompts, self.tokenizers, self.text_encoders)
        if negatives is None:
            neg_text, neg_pooled = torch.zeros_like(text), torch.zeros_like(pooled)
        else:
            neg_text, neg_pooled = encode_prompts(negatives, self.tokenizers, self.text_encoders)
        return (text, pooled), (neg_text, neg_pooled)

    @torch.inference_mode()
    def encode_face(
        self, images: FaceInput | Sequence[FaceInput], crop: str = "none", on_multiple: str = "largest"
    ) -> Identity:
        """Encode one or several photos of one person into an :class:`Identity` (reusable for any prompt).

        With a face pack, every photo goes through detection (the largest face, or :class:`MultipleFacesError`
        with ``on_multiple="error"``) and gets an ArcFace embedding. ``crop="face"`` feeds the 5-point-aligned face
        crop to the image encoder and VAE; ``crop="none"`` (the authors' setting) the whole photo. Several photos
        are combined as :mod:`lcmla_sdk.identity` describes.
        """
        faces = list(images) if isinstance(images, (list, tuple)) else [images]
        if not faces:
            raise InvalidImageError("face: no image given")
        validation.choice(crop, "crop", CROPS)
        validation.choice(on_multiple, "on_multiple", ON_MULTIPLE)
        validation.check_memory(validation.vae_bytes(self, len(faces), self.face_size, self.face_size), self.device,
                                f"face ({len(faces)} photos)", "encode fewer photos at once")  # fmt: skip
        analyzer = self.face_analyzer
        if analyzer is None and (crop == "face" or on_multiple == "error"):
            raise ModelFilesError(
                "faces: face detection needs an insightface pack: pass faces=DIR to from_pretrained, or add a "
                "'faces' component to the model directory"
            )
        pictures, sources, detections = [], [], []
        for face in faces:
            image = load_rgb(face)
            sources.append(pixel_sha256(image))
            found = analyzer.find_face(image, on_multiple) if analyzer is not None else None
            detections.append(found)
            pictures.append(align_face(image, found.landmarks, self.face_size) if crop == "face" else image)
        clip = torch.cat([clip_pixels(p, self.clip_size) for p in pictures]).to(self.device, self.dtype)
        cond, uncond = self.adapter(clip)
        pixels = torch.cat([vae_pixels(p, self.face_size) for p in pictures]).to(self.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        arcface = torch.from_numpy(np.stack([d.embedding for d in detections])) if analyzer is not None else None
        return Identity(
            cond_tokens=cond.mean(0, keepdim=True), uncond_tokens=uncond[:1], latent_mean=dist.mean.float(),
            latent_std=dist.std.float(), arcface=arcface, sources=sources, model_fingerprint=self.fingerprint,
            crop=crop, boxes=[[float(v) for v in d.box] if d is not None else None for d in detections],
        )  # fmt: skip

    def load_identity(self, path: str | Path) -> Identity:
        """:meth:`Identity.load` that refuses an identity made by another model."""
        return Identity.load(path, expected_fingerprint=self.fingerprint)

    def make_scheduler(self, mode: str):
        """The diffusers scheduler of a mode. DPM-Solver++ ends on sigma(t=0) ("sigma_min"), as the diffusers version
        of the authors' code did (diffusers' current default ends on zero)."""
        config = self.config["scheduler"]
        if mode == "fast":
            return LCMScheduler.from_config(config)
        return DPMSolverMultistepScheduler.from_config(config, final_sigmas_type="sigma_min")

    def step_table(self, mode: str, steps: int) -> StepTable:
        """Per-step timesteps and coefficients of a mode's schedule, on the device (:mod:`lcmla_sdk.schedule`)."""
        scheduler = self.make_scheduler(mode)
        scheduler.set_timesteps(steps)
        return build_table(scheduler, self.device)

    def prepare_noise(self, request: _Request, face: Identity, table: StepTable) -> _Noise:
        """Draw every random tensor of the generation ahead, from each image's own CPU generator, in the order the
        authors' loop draws them: initial noise, the reference latent sample, (its own noise when its shape differs
        from the image's), then the scheduler's noise step by step. So a seed gives the same image eagerly and from
        a CUDA graph, alone or in a batch."""
        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
        shape = (1, 4, request.height // self.vae_scale, request.width // self.vae_scale)
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators])
        refs = face.num_references
        face_eps = torch.cat([torch.randn(face.latent_mean.shape, generator=g) for g in generators])
        # The authors noise the face with the generation's initial noise; a face latent of another shape gets its
        # own draw from the same per-image generator.
        if face.latent_mean.shape[1:] == noise.shape[1:]:
            face_noise = noise.repeat_interleave(refs, 0)
        else:
            face_noise = torch.cat([torch.randn(face.latent_mean.shape, generator=g) for g in generators])
        step_noise = None
        if table.noise_steps:
            step_noise = torch.stack([
                torch.cat([torch.randn(shape, generator=g, dtype=self.dtype) for g in generators])
                for _ in range(table.noise_steps)
            ])  # fmt: skip
        if request.face_noise == "fixed":
            fixed_eps, face_noise = self.fixed_face_noise(face)
            face_eps, face_noise = fixed_eps.repeat(len(generators), 1, 1, 1), face_noise.repeat(len(generators), 1, 1, 1)
        face_latents = self.face_latents(face, face_eps)
        to = {"device": self.device, "dtype": self.dtype}
        return _Noise(
            noise.to(**to), face_latents.to(**to), face_noise.to(**to),
            step_noise.to(**to) if step_noise is not None else None,
        )

    def fixed_face_noise(self, face: Identity) -> tuple[torch.Tensor, torch.Tensor]:
        """The identity's own reference-latent sample noise and noising noise (``face_noise="fixed"``)."""
        generator = torch.Generator("cpu").manual_seed(FIXED_FACE_NOISE_SEED)
        return tuple(torch.randn(face.latent_mean.shape, generator=generator) for _ in range(2))

    def face_latents(self, face: Identity, eps: torch.Tensor) -> torch.Tensor:
        """Scaled samples of the reference latents, ``eps`` with ``images x references`` rows (image-major)."""
        repeat = eps.shape[0] // face.num_references
        mean, std = (x.cpu().float().repeat(repeat, 1, 1, 1) for x in (face.latent_mean, face.latent_std))
        return (mean + std * eps) * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ the call
    @torch.inference_mode()
    def generate(
        self,
        face: FaceInput | Sequence[FaceInput] | Identity,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        mode: str = "quality",
        steps: int | None = None,
        guidance: Sequence[float] = DEFAULT_GUIDANCE,
        height: int | None = None,
        width: int | None = None,
        use_kv: bool = True,
        adapter_scale: float = 1.0,
        output: str = "pil",
        callback: StepCallback | None = None,
        kv_cache: bool = False,
        face_noise: str | None = None,
        vae: str = "full",
    ):
        """Generate ``num_images`` images per prompt of the person in ``face`` (photo(s), or an :class:`Identity`
        from :meth:`encode_face`, which skips all face work).

        ``mode="quality"``: DPM-Solver++ (50 steps) with three-branch guidance ``guidance`` =
        (no_kv, full, kv). ``mode="fast"``: LCM scheduler with the LCM-LoRA denoiser, 4 steps, conditional
        branch only. ``use_kv=False``: IP-Adapter only, i.e. plain CFG with scale ``no_kv + full``.
        ``kv_cache=True``: the K/V-encoder's output for this schedule is computed once per identity, with the
        identity's fixed reference noise (``face_noise="fixed"``) instead of each image's initial noise (the
        authors' pairing), and reused by later calls. ``vae="tiny"``: decode with the tiny VAE (previews).
        ``callback(step_index, timestep, latents)`` runs after every step.
        """
        # 1. Check inputs
        request = self.check_inputs(
            prompt, negative_prompt, num_images, seed, mode, steps, guidance, height, width, use_kv,
            adapter_scale, output, callback, kv_cache, face_noise, vae,
        )  # fmt: skip

        # 2. Encode prompts (one row per image) and the K/V-encoder's prompt
        (text, pooled), (neg_text, neg_pooled) = self.encode_prompt(request.prompts, request.negative_prompts)
        text, pooled, neg_text, neg_pooled = (x.repeat_interleave(num_images, 0) for x in (text, pooled, neg_text, neg_pooled))

        # 3. Encode the face once (image tokens and VAE latents), or take a ready Identity
        if isinstance(face, Identity):
            validation.identity(self, face)
            identity = face
        else:
            identity = self.encode_face(face)

        # 4. Schedule and every random draw
        table = self.step_table(request.mode, request.steps)
        noise = self.prepare_noise(request, identity, table)

        # 5. Denoising loop (a CUDA graph per shape on a GPU)
        latents = self.denoise(request, identity, (text, pooled, neg_text, neg_pooled), noise, table, callback)

        # 6. Decode
        return self.decode(latents, request.output, request.vae)

    def denoise(self, request: _Request, identity: Identity, prompts: tuple, noise: _Noise, table: StepTable,
                callback: StepCallback | None = None) -> torch.Tensor:  # fmt: skip
        """The sampling loop from ``noise.latents``: buffers for :func:`lcmla_sdk.sampling.sample`, then its run."""
        text, pooled, neg_text, neg_pooled = prompts
        batch, refs = text.shape[0], identity.num_references
        to = {"device": self.device, "dtype": self.dtype}
        tokens, uncond_tokens = (x.to(**to).expand(batch, -1, -1) for x in (identity.cond_tokens, identity.uncond_tokens))
        ids = time_ids(request.height, request.width, batch, self.dtype, self.device)
        scale = torch.full((batch,), request.adapter_scale, device=self.device)
        kv_cache, layout = (None, None)
        if request.use_kv and request.kv_cache:
            kv_cache, layout = self.identity_kv(identity, request, table, neg_text[:1], neg_pooled[:1])
        spec = StepSpec(request.mode, batch, refs, request.use_kv, layout)
        if request.mode == "fast":
            values = {"text": text, "pooled": pooled, "time_ids": ids, "image_tokens": tokens, "adapter_scale": scale}
        else:
            halves = 2 if request.use_kv else 1  # [uncond, cond] without K/V, then with them
            values = {
                "text": torch.cat([neg_text, text] * halves), "pooled": torch.cat([neg_pooled, pooled] * halves),
                "time_ids": ids.repeat(2 * halves, 1), "image_tokens": torch.cat([uncond_tokens, tokens] * halves),
                "adapter_scale": scale.repeat(2 * halves),
                "guidance": torch.tensor(request.guidance, dtype=torch.float32, device=self.device),
            }  # fmt: skip
        values["latents"] = noise.latents
        if request.use_kv and kv_cache is None:
            enc_text, enc_pooled = self.encoder_prompt_embeds(batch * refs)
            if request.mode == "quality":
                neg = (neg_text.repeat_interleave(refs, 0), neg_pooled.repeat_interleave(refs, 0))
                enc_text, enc_pooled = torch.cat([neg[0], enc_text]), torch.cat([neg[1], enc_pooled])
            rows = enc_text.shape[0]
            values.update({
                "encoder_text": enc_text, "encoder_pooled": enc_pooled,
                # The authors give the encoder the generation's micro-conditioning, not the face's size.
                "encoder_time_ids": time_ids(request.height, request.width, rows, self.dtype, self.device),
                "face_latents": noise.face_latents.repeat(spec.groups, 1, 1, 1),
                "face_noise": noise.face_noise.repeat(spec.groups, 1, 1, 1),
            })  # fmt: skip
        values = {name: value.contiguous() for name, value in values.items()}
        networks = Networks(
            kv_encoder=self.kv_encoder if request.use_kv and kv_cache is None else None,
            denoiser=self.denoiser if request.mode == "quality" else None,
            lcm_denoiser=self.lcm_denoiser if request.mode == "fast" else None,
            adapter=None,
        )
        key = shape_key(spec, values, (self._networks_version,))
        graphs = self._graphs if self._can_capture(networks) and key not in self._uncapturable else None
        try:
            return sample(networks, spec, values, table, noise.steps, kv_cache, graphs, key, callback)
        except RuntimeError as error:
            if graphs is None or isinstance(error, torch.OutOfMemoryError) or key in self._graphs.keys():
                raise  # not a capture failure
            say_once(f"CUDA graph capture failed for this shape ({error}); its sampling loop runs eagerly")
            self._uncapturable.add(key)
            return sample(networks, spec, values, table, noise.steps, kv_cache, None, key, callback)

    def _can_capture(self, networks: Networks) -> bool:
        if self.device.type != "cuda":
            say_once("CUDA graphs need a CUDA device: the sampling loop runs eagerly", logging.INFO)
            return False
        if not self.cuda_graphs:
            return False
        if not all(isinstance(n, torch.nn.Module) for n in vars(networks).values() if n is not None):
            say_once("exported networks run their own engines: the sampling loop runs eagerly over them")
            return False
        return True

    def warmup(self, mode: str = "fast", num_images: int = 1, height: int | None = None, width: int | None = None,
               references: int = 1, use_kv: bool = True, kv_cache: bool = False, steps: int | None = None) -> None:  # fmt: skip
        """Capture the sampling step for one shape ahead of the first real call (on a GPU; no-op work elsewhere)
        by generating once from a random identity."""
        latent = self.face_size // self.vae_scale
        tokens = self.adapter.resampler.latents.shape[1]
        cross = self.unet.config.cross_attention_dim
        identity = Identity(
            cond_tokens=torch.zeros(1, tokens, cross), uncond_tokens=torch.zeros(1, tokens, cross),
            latent_mean=torch.zeros(references, 4, latent, latent), latent_std=torch.ones(references, 4, latent, latent),
            model_fingerprint=self.fingerprint,
        )  # fmt: skip
        self.generate(identity, "", num_images=num_images, seed=0, mode=mode, steps=steps, height=height, width=width,
                      use_kv=use_kv, kv_cache=kv_cache, output="latent")  # fmt: skip
        if kv_cache:
            self._kv_cache.clear()

    def encoder_prompt_embeds(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V-encoder's prompt, encoded once (it never changes)."""
        with self._lock:
            if self._encoder_prompt is None:
                (text, pooled), _ = self.encode_prompt([self.encoder_prompt], None)
                self._encoder_prompt = (text, pooled)
        text, pooled = self._encoder_prompt
        return text.expand(rows, -1, -1), pooled.expand(rows, -1)

    def compile_decoder(self, cache: str | Path | None = None) -> float:
        """Compile the full VAE's decode with ``torch.compile`` (Inductor fuses its normalisations and activations,
        the bulk of its time at 1024^2) and run it once; return the seconds that took.

        ``cache``: a file for Inductor's artefacts (``torch.compiler.load_cache_artifacts`` before compiling,
        ``save_cache_artifacts`` after), so the next process on this machine compiles from it in a fraction of the
        time. The batch dimension is compiled dynamic: one compilation serves every batch size.
        """
        import time

        path = Path(cache).expanduser() if cache is not None else None
        if path is not None and path.is_file():
            torch.compiler.load_cache_artifacts(path.read_bytes())
        vae = self.vae
        compiled = torch.compile(lambda z: vae.decode(z).sample)

        def decode(latents: torch.Tensor) -> torch.Tensor:
            torch._dynamo.mark_dynamic(latents, 0)
            return compiled(latents)

        begin = time.perf_counter()
        side = self.default_size // self.vae_scale
        with torch.inference_mode():
            decode(torch.zeros(2, 4, side, side, device=self.device, dtype=vae.dtype))
        seconds = time.perf_counter() - begin
        if path is not None:
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(path.name + ".tmp")
                temporary.write_bytes(artifacts[0])
                temporary.replace(path)
        self._vae_decode = decode
        return seconds

    def identity_kv(self, identity: Identity, request: _Request, table: StepTable, neg_text, neg_pooled):
        """``(K/V per step (steps, G, elements), layout)`` of the identity for this schedule, computed once with its
        fixed reference noise (:func:`lcmla_sdk.sampling.flatten_kv`) and kept, least recently used out beyond
        ``KV_CACHE_BYTES``."""
        groups = 1 if request.mode == "fast" else 2
        key = (identity.digest(), request.mode, tuple(table.host_timesteps), request.height, request.width,
               str(request.negative_prompts[0]) if request.negative_prompts else None)  # fmt: skip
        with self._lock:
            if key in self._kv_cache:
                self._kv_cache.move_to_end(key)
                return self._kv_cache[key]
        refs = identity.num_references
        eps, face_noise = self.fixed_face_noise(identity)
        to = {"device": self.device, "dtype": self.dtype}
        face, face_noise = self.face_latents(identity, eps).to(**to), face_noise.to(**to)
        enc_text, enc_pooled = self.encoder_prompt_embeds(refs)
        if groups == 2:
            enc_text = torch.cat([neg_text.expand(refs, -1, -1), enc_text])
            enc_pooled = torch.cat([neg_pooled.expand(refs, -1), enc_pooled])
            face, face_noise = face.repeat(2, 1, 1, 1), face_noise.repeat(2, 1, 1, 1)
        ids = time_ids(request.height, request.width, face.shape[0], self.dtype, self.device)
        encoder, steps = self.kv_encoder, []
        for index in range(table.steps):
            row = table.coefficients[index]
            timestep = table.timesteps[index : index + 1].expand(face.shape[0])
            kv = encoder(noise_reference(row, face, face_noise), timestep, enc_text, enc_pooled, ids)
            flat, layout = flatten_kv(join_references(kv, groups))
            if index == 0 and flat.numel() * flat.element_size() * table.steps > KV_CACHE_BYTES:
                need = flat.numel() * flat.element_size() * table.steps / 2**30
                raise ValueError(f"kv_cache: this identity's K/V for {table.steps} steps need {need:.1f} GiB, over "
                                 f"the cache's {KV_CACHE_BYTES / 2**30:.0f} GiB; use fewer steps or kv_cache=False")  # fmt: skip
            steps.append(flat)
        entry = (torch.stack(steps), layout)
        with self._lock:
            self._kv_cache[key] = entry
            while len(self._kv_cache) > 1 and sum(e[0].numel() * e[0].element_size() for e in self._kv_cache.values()) > KV_CACHE_BYTES:
                self._kv_cache.popitem(last=False)
        return entry

    def decode(self, latents: torch.Tensor, request_output: str, vae: str = "full"):
        """Latents -> images: ``"pt"`` float in [0, 1] on the model's device, ``"np"`` uint8 arrays, PIL images."""
        if request_output == "latent":
            return latents
        if vae == "tiny":  # TAESD decodes the scaled latents directly
            images = self.tiny_vae.decode(latents.to(self.tiny_vae.dtype)).sample
        else:
            images = self._vae_decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor)
        if request_output == "pt":
            return (images.float().clamp(-1, 1) + 1) / 2
        pil = to_pil(images)
        return [np.asarray(p) for p in pil] if request_output == "np" else pil


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """Frozen, eval-mode, on ``device`` in ``dtype``. (``nn.Module.to`` skips a diffusers warning that fires for
    models with no fp32-only modules.)"""
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)


def _randomised_preset(config: dict[str, Any], seed: int, dtype: torch.dtype, device: torch.device) -> Components:
    """Random components with LCM-Lookahead's extra weights randomised too, so every path affects the output."""
    components = build_random_components(config, seed, dtype, device)
    unet = components.unet
    kv_blocks = install_lookahead_processors(unet)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed + 1)
        for name in kv_blocks:
            processor = unet.get_submodule(name).attn2.processor
            torch.nn.init.normal_(processor.to_k_ip.weight, std=processor.to_k_ip.in_features**-0.5)
            torch.nn.init.normal_(processor.to_v_ip.weight, std=processor.to_v_ip.in_features**-0.5)
        add_kv_encoder_lora(unet, kv_blocks, config["kv_encoder"]["lora_rank"], config["kv_encoder"].get("kv_lora_rank"))
        for param_name, param in unet.named_parameters():
            if ".lora_B.kv_encoder" in param_name:
                torch.nn.init.normal_(param, std=0.02)
        if config.get("lcm_lora"):
            add_random_lcm_lora(unet, config["lcm_lora"]["rank"])
    return components


def _load_tiny_vae(folder: str | Path) -> AutoencoderTiny:
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ModelFilesError(f"tiny_vae: {path} is not a diffusers AutoencoderTiny folder (no config.json)")
    return AutoencoderTiny.from_pretrained(str(path), local_files_only=True)
