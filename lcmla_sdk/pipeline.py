"""``Personalizer``: one face photo + a prompt -> new images of that person (LCM-Lookahead on SDXL)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from . import model_dir
from .attention import install_lookahead_processors
from .errors import InvalidImageError, ModelFilesError
from .faces import ON_MULTIPLE, FaceAnalyzer, align_face
from .guidance import Guidance, three_branch
from .identity import Identity
from .images import FACE_RESIZES, FaceInput, clip_pixels, load_rgb, pixel_sha256, squash, to_pil, vae_pixels
from .manifest import sha256_json
from .lora import LCM_ADAPTER, add_kv_encoder_lora, add_random_lcm_lora, has_adapter
from .networks import Denoiser, ImageAdapter, KVEncoder
from .presets import PRESETS, Components, build_random_components, preset_config
from .text import encode_prompts, time_ids

MODES = {"quality": 50, "fast": 4}  # mode -> default number of steps
OUTPUTS = ("pil", "np", "pt", "latent")
CROPS = ("none", "face")
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


def default_device_and_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """fp16 on a GPU, fp32 on the CPU, unless told otherwise."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype if dtype is not None else (torch.float16 if device.type == "cuda" else torch.float32)


class Personalizer:
    """Encoder-based face personalization with LCM-Lookahead's KV-encoder, denoiser and image adapter.

    The sampling loop calls three networks through their tensor interfaces (:mod:`lcmla_sdk.networks`):
    ``self.kv_encoder``, ``self.denoiser`` / ``self.lcm_denoiser`` and ``self.adapter``.
    """

    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        fingerprint: str | None = None,
        faces: str | Path | None = None,
        source: model_dir.ModelLayout | None = None,
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
        if not has_adapter(unet, "kv_encoder"):
            add_kv_encoder_lora(unet, self.kv_blocks, config["kv_encoder"]["lora_rank"], config["kv_encoder"].get("kv_lora_rank"))
        self.unet = _place(unet, device, dtype)
        self.kv_encoder = KVEncoder(self.unet, len(self.kv_blocks))
        self.denoiser = Denoiser(self.unet)
        self.lcm_denoiser = Denoiser(self.unet, adapters=(LCM_ADAPTER,)) if has_adapter(unet, LCM_ADAPTER) else None

        self.adapter = ImageAdapter(components.image_encoder, components.resampler)
        _place(self.adapter, device, dtype)
        self.tokenizers = (components.tokenizer, components.tokenizer_2)
        self.text_encoders = (_place(components.text_encoder, device, dtype), _place(components.text_encoder_2, device, dtype))
        # The stock SDXL VAE overflows in fp16: keep it in fp32 when its config asks for upcasting.
        vae_dtype = torch.float32 if components.vae.config.force_upcast else dtype
        self.vae = _place(components.vae, device, vae_dtype)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # Latent sides must survive every UNet downsampling.
        self.size_multiple = self.vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)
        self.default_size = unet.config.sample_size * self.vae_scale
        self.clip_size: int = components.image_encoder.config.image_size
        self.noise_scheduler = DDPMScheduler.from_config(config["scheduler"])

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        faces: str | Path | None = None,
    ) -> Personalizer:
        """Load an lcmla model directory (see :mod:`lcmla_sdk.model_dir`) or an embedded preset.

        A directory is validated (files, keys, shapes, dtypes) before any weight is read; nothing is downloaded.
        ``faces`` overrides the directory's face pack. Presets (``"tiny"``, ``"sdxl"``) have seeded random
        weights: ``tiny`` makes noise, not faces; ``sdxl`` is the full architecture for export and benchmarks.
        """
        device, dtype = default_device_and_dtype(device, dtype)
        if str(name) in PRESETS:
            return cls.from_config(preset_config(str(name)), device, dtype, seed, label=str(name), faces=faces)
        if not model_dir.is_model_dir(name):
            raise ModelFilesError(f"name: {name!r} is neither a model directory nor an embedded preset {PRESETS}")
        layout = model_dir.validate(name)
        if faces is None and "faces" in layout.components:
            faces = layout.components["faces"].path
        return cls(model_dir.load(layout, dtype), device, dtype, layout.fingerprint(), faces, source=layout)

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        label: str = "custom",
        faces: str | Path | None = None,
    ) -> Personalizer:
        """Random weights for an architecture given as constructor arguments (the presets' JSON format).

        Weights are drawn on the CPU directly in ``dtype`` (no fp32 copy of a full-size UNet in host memory), so
        the same config, seed and dtype give the same weights on every machine.
        """
        device, dtype = default_device_and_dtype(device, dtype)
        fingerprint = sha256_json({"preset": label, "seed": seed, "dtype": str(dtype), "config": config})
        return cls(_randomised_preset(config, seed, dtype), device, dtype, fingerprint, faces)

    def use_exported(self, folder: str | Path, backend: str = "tensorrt") -> None:
        """Run the KV-encoder, denoisers and adapter from an export folder (``lcmla export``) instead of PyTorch.

        ``backend`` is ``"tensorrt"`` (engines, GPU) or ``"onnxruntime"`` (ONNX graphs, CPU). The folder's manifest
        must have been made for this model (its fingerprint) and, for TensorRT, this GPU and TensorRT version.
        """
        from .engines.runtime import load_networks

        for attribute, network in load_networks(folder, self.fingerprint, backend, self.device, self.dtype).items():
            setattr(self, attribute, network)

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
    def has_kv_encoder(self) -> bool:
        """``False`` for a model converted from the authors' no-K/V checkpoint (``encoder_plus_adapter_no_kv.bin``,
        made for their IP-Adapter-only pipeline): it generates without encoder K/V and refuses ``use_kv=True``."""
        return bool(self.config["pipeline"].get("has_kv_encoder", True))

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
        use_kv: bool | None,
        adapter_scale: float,
        output: str,
        callback: StepCallback | None,
    ) -> _Request:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: expected a string or a non-empty list of strings")
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images: must be a positive integer, got {num_images!r}")
        batch = len(prompts) * num_images
        if seed is None:
            seeds = [random.SystemRandom().randrange(2**32) for _ in range(batch)]
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(batch)]
        else:
            seeds = list(seed)
            if len(seeds) != batch:
                raise ValueError(f"seed: {len(seeds)} seeds given for {batch} images (prompts x num_images)")
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {tuple(MODES)}")
        if mode == "fast" and self.lcm_denoiser is None:
            raise ValueError("mode: 'fast' needs an LCM-LoRA, and this model has none")
        steps = MODES[mode] if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: must be a positive integer, got {steps!r}")
        if len(guidance) != 3 or any(not np.isfinite(w) or w < 0 for w in guidance):
            raise ValueError(f"guidance: expected three non-negative weights (no_kv, full, kv), got {guidance!r}")
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size < self.size_multiple or size % self.size_multiple:
                raise ValueError(f"{name}: {size!r} is not allowed; use a positive multiple of {self.size_multiple}")
        use_kv = self.has_kv_encoder if use_kv is None else use_kv
        if not isinstance(use_kv, bool):
            raise ValueError(f"use_kv: expected True, False or None (the model's default), got {use_kv!r}")
        if use_kv and not self.has_kv_encoder:
            raise ValueError(
                "use_kv: this model was converted from the authors' no-K/V checkpoint, whose K/V-encoder was not "
                "trained for generation; use use_kv=False (its default: IP-Adapter only, plain CFG)"
            )
        if not np.isfinite(adapter_scale) or adapter_scale < 0:
            raise ValueError(f"adapter_scale: must be a non-negative number, got {adapter_scale!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output: {output!r} is not one of {OUTPUTS}")
        if callback is not None and not callable(callback):
            raise ValueError("callback: must be callable")
        return _Request(
            prompts, negatives, seeds, mode, steps, Guidance(*map(float, guidance)), height, width, use_kv, adapter_scale
        )

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
        self,
        images: FaceInput | Sequence[FaceInput],
        crop: str = "none",
        on_multiple: str = "largest",
        face_resize: str = "squash",
    ) -> Identity:
        """Encode one or several photos of one person into an :class:`Identity` (reusable for any prompt).

        With a face pack, every photo goes through detection (the largest face, or :class:`MultipleFacesError`
        with ``on_multiple="error"``) and gets an ArcFace embedding. ``crop="face"`` feeds the 5-point-aligned face
        crop to the image encoder and VAE; ``crop="none"`` the photo. ``face_resize="squash"`` (the authors')
        resizes the whole photo to the face size without keeping its aspect ratio; ``"crop"`` takes its centre
        square. Several photos are combined as :mod:`lcmla_sdk.identity` describes.
        """
        faces = list(images) if isinstance(images, (list, tuple)) else [images]
        if not faces:
            raise InvalidImageError("face: no image given")
        if crop not in CROPS:
            raise ValueError(f"crop: {crop!r} is not one of {CROPS}")
        if on_multiple not in ON_MULTIPLE:
            raise ValueError(f"on_multiple: {on_multiple!r} is not one of {ON_MULTIPLE}")
        if face_resize not in FACE_RESIZES:
            raise ValueError(f"face_resize: {face_resize!r} is not one of {FACE_RESIZES}")
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
            picture = align_face(image, found.landmarks, self.face_size) if crop == "face" else image
            pictures.append(squash(picture, self.face_size) if face_resize == "squash" else picture)
        clip = torch.cat([clip_pixels(p, self.clip_size) for p in pictures]).to(self.device, self.dtype)
        cond, uncond = self.adapter(clip)
        pixels = torch.cat([vae_pixels(p, self.face_size) for p in pictures]).to(self.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        arcface = torch.from_numpy(np.stack([d.embedding for d in detections])) if analyzer is not None else None
        return Identity(
            cond_tokens=cond.mean(0, keepdim=True), uncond_tokens=uncond[:1], latent_mean=dist.mean.float(),
            latent_std=dist.std.float(), arcface=arcface, sources=sources, model_fingerprint=self.fingerprint,
            crop=crop, face_resize=face_resize,
            boxes=[[float(v) for v in d.box] if d is not None else None for d in detections],
        )  # fmt: skip

    def load_identity(self, path: str | Path) -> Identity:
        """:meth:`Identity.load` that refuses an identity made by another model."""
        return Identity.load(path, expected_fingerprint=self.fingerprint)

    def prepare_latents(self, request: _Request, face: Identity):
        """Per-image generators; initial noise; the face latents (``images x references``, image-major) sampled
        per image; the noise that noises them."""
        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
        shape = (1, 4, request.height // self.vae_scale, request.width // self.vae_scale)
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators])
        refs = face.num_references
        face_eps = torch.cat([torch.randn(face.latent_mean.shape, generator=g) for g in generators])
        mean, std = face.latent_mean.cpu().repeat(len(generators), 1, 1, 1), face.latent_std.cpu().repeat(len(generators), 1, 1, 1)
        face_latents = (mean + std * face_eps) * self.vae.config.scaling_factor
        # The authors noise the face with the generation's initial noise; a face latent of another shape
        # gets its own draw from the same per-image generator.
        if face_latents.shape[1:] == noise.shape[1:]:
            face_noise = noise.repeat_interleave(refs, 0)
        else:
            face_noise = torch.cat([torch.randn(face.latent_mean.shape, generator=g) for g in generators])
        to = {"device": self.device, "dtype": self.dtype}
        return generators, noise.to(**to), face_latents.to(**to), face_noise.to(**to)

    def make_scheduler(self, mode: str):
        config = self.config["scheduler"]
        return LCMScheduler.from_config(config) if mode == "fast" else DPMSolverMultistepScheduler.from_config(config)

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
        guidance: Sequence[float] = (3.0, 2.0, 2.0),
        height: int | None = None,
        width: int | None = None,
        use_kv: bool | None = None,
        adapter_scale: float = 1.0,
        output: str = "pil",
        callback: StepCallback | None = None,
    ):
        """Generate ``num_images`` images per prompt of the person in ``face`` (photo(s), or an :class:`Identity`
        from :meth:`encode_face`, which skips all face work).

        ``mode="quality"``: DPM-Solver++ (50 steps) with three-branch guidance ``guidance`` =
        (no_kv, full, kv). ``mode="fast"``: LCM scheduler with the LCM-LoRA denoiser, 4 steps, conditional
        branch only. ``use_kv=False``: IP-Adapter only, i.e. plain CFG with scale ``no_kv + full``; ``None``: the
        model's default (:attr:`has_kv_encoder`).
        ``callback(step_index, timestep, latents)`` runs after every step.
        """
        # 1. Check inputs
        request = self.check_inputs(
            prompt, negative_prompt, num_images, seed, mode, steps, guidance,
            height, width, use_kv, adapter_scale, output, callback,
        )  # fmt: skip
        repeat = num_images

        # 2. Encode prompts: the generation's and the KV-encoder's (conditional and negative halves)
        (text, pooled), (neg_text, neg_pooled) = self.encode_prompt(request.prompts, request.negative_prompts)
        text, pooled, neg_text, neg_pooled = (x.repeat_interleave(repeat, 0) for x in (text, pooled, neg_text, neg_pooled))
        (enc_text, enc_pooled), _ = self.encode_prompt([self.encoder_prompt], None)
        batch = text.shape[0]

        # 3. Encode the face once (image tokens and VAE latents), or take a ready Identity
        if isinstance(face, Identity):
            face.check_model(self.fingerprint)
            identity = face
        else:
            identity = self.encode_face(face)
        tokens, uncond_tokens = (
            x.to(self.device, self.dtype).expand(batch, -1, -1) for x in (identity.cond_tokens, identity.uncond_tokens)
        )
        # The KV-encoder runs once per image and reference, image-major.
        refs = identity.num_references
        enc_text, enc_pooled = enc_text.expand(batch * refs, -1, -1), enc_pooled.expand(batch * refs, -1)
        enc_neg_text, enc_neg_pooled = neg_text.repeat_interleave(refs, 0), neg_pooled.repeat_interleave(refs, 0)

        # 4. Prepare latents, noise and timesteps
        generators, noise, face_latents, face_noise = self.prepare_latents(request, identity)
        scheduler = self.make_scheduler(request.mode)
        scheduler.set_timesteps(request.steps, device=self.device)
        latents = noise * scheduler.init_noise_sigma
        gen_ids = time_ids(request.height, request.width, batch, self.dtype, self.device)
        face_ids = time_ids(self.face_size, self.face_size, batch * refs, self.dtype, self.device)

        # 5. Denoising loop
        if request.mode == "fast":
            step_fn = self._fast_step
            cond = (text, pooled, gen_ids, tokens, enc_text, enc_pooled, face_ids)
        else:
            step_fn = self._guided_step
            cond = (
                torch.cat([neg_text, text]), torch.cat([neg_pooled, pooled]), gen_ids.repeat(2, 1),
                torch.cat([uncond_tokens, tokens]), torch.cat([enc_neg_text, enc_text]),
                torch.cat([enc_neg_pooled, enc_pooled]), face_ids.repeat(2, 1),
            )  # fmt: skip
        for index, t in enumerate(scheduler.timesteps):
            t_batch = t.reshape(1).expand(batch).to(self.device)
            t_faces = t_batch.repeat_interleave(refs)
            noisy_face = self.noise_scheduler.add_noise(face_latents, face_noise, t_faces.long())
            latent_in = scheduler.scale_model_input(latents, t)
            eps = step_fn(request, latent_in, noisy_face, t_batch, t_faces, *cond)
            latents = scheduler.step(eps, t, latents, generator=generators, return_dict=True).prev_sample
            if callback is not None:
                callback(index, int(t), latents)

        # 6. Decode
        return self.decode(latents, request_output=output)

    def _fast_step(self, request, latent_in, noisy_face, t, t_faces, text, pooled, ids, tokens, enc_text, enc_pooled, face_ids):
        """LCM: the conditional full branch only, through the LCM-LoRA denoiser."""
        kv = None
        if request.use_kv:
            kv = _join_references(self.kv_encoder(noisy_face, t_faces, enc_text, enc_pooled, face_ids), latent_in.shape[0])
        return self.lcm_denoiser(latent_in, t, text, pooled, ids, tokens, request.adapter_scale, kv)

    def _guided_step(self, request, latent_in, noisy_face, t, t_faces, text, pooled, ids, tokens, enc_text, enc_pooled, face_ids):
        """Two denoiser passes on [uncond, cond] (without / with encoder K/V), combined in three branches."""
        latent_in, t2 = torch.cat([latent_in, latent_in]), torch.cat([t, t])
        eps_nokv = self.denoiser(latent_in, t2, text, pooled, ids, tokens, request.adapter_scale, None)
        if request.use_kv:
            faces, t_faces2 = torch.cat([noisy_face, noisy_face]), torch.cat([t_faces, t_faces])
            kv = _join_references(self.kv_encoder(faces, t_faces2, enc_text, enc_pooled, face_ids), latent_in.shape[0])
            eps_full = self.denoiser(latent_in, t2, text, pooled, ids, tokens, request.adapter_scale, kv)
        else:
            eps_full = eps_nokv
        return three_branch(*eps_nokv.chunk(2), *eps_full.chunk(2), request.guidance)

    def decode(self, latents: torch.Tensor, request_output: str):
        if request_output == "latent":
            return latents
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        if request_output == "pt":
            return ((images.float().clamp(-1, 1) + 1) / 2).cpu()
        pil = to_pil(images)
        return [np.asarray(p) for p in pil] if request_output == "np" else pil


def _join_references(kv: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """``(batch x references, tokens, width)`` K/V -> ``(batch, references x tokens, width)``: each image attends
    over the K/V of all its references, reference after reference."""
    return tuple(x.reshape(batch, -1, x.shape[-1]) for x in kv)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """Frozen, eval-mode, on ``device`` in ``dtype``. (``nn.Module.to`` skips a diffusers warning that fires for
    models with no fp32-only modules.)"""
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)


def _randomised_preset(config: dict[str, Any], seed: int, dtype: torch.dtype) -> Components:
    """Random components with LCM-Lookahead's extra weights randomised too, so every path affects the output."""
    components = build_random_components(config, seed, dtype)
    unet = components.unet
    kv_blocks = install_lookahead_processors(unet)
    with torch.random.fork_rng(devices=[]):
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
