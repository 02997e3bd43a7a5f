"""``Personalizer``: one face photo + a prompt -> new images of that person (LCM-Lookahead on SDXL)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler

from . import validation
from .decoding import Decoder, load_tiny_vae
from .errors import InvalidImageError, ModelFilesError
from .face_analyzer import ON_MULTIPLE, FaceAnalyzer
from .faces import AUTO, FaceBackend, align_face
from .freeu import AUTHORS_FREEU, install_freeu, stage_values
from .guidance import DEFAULT_GUIDANCE
from .identity import Identity, detection_fields
from .images import FACE_RESIZES, FaceInput, clip_pixels, load_rgb, pixel_sha256, squash, vae_pixels
from .integrity import sha256_json
from .kv_cache import IdentityKVCache, compute_kv
from .lora import KV_ENCODER_ADAPTER, LCM_ADAPTER, has_adapter, materialize
from .model_dir import checks, loading, saving
from .model_dir.format import ModelLayout
from .networks import Denoiser, ImageAdapter, KVEncoder
from .noise import Noise, face_latents, fixed_face_noise
from .noise import draw as draw_noise
from .presets import PRESETS, Components, build_random_components, preset_config
from .request import Request, check_request
from .sampling import Networks, StepGraphs, StepSpec, sample, say_once, shape_key
from .schedule import StepTable, build_table
from .text import GraphedTextEncoders, encode_prompts, time_ids
from .wiring import wire_unet

CROPS = ("none", "face")
GRAPH_MEMORY_BYTES = 32 * 2**30  # captured sampling steps kept per Personalizer (least recently used out)
StepCallback = Callable[[int, int, torch.Tensor], Any]
FaceEncoding = Identity  # the name of the first release


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
        faces: str | Path | None = AUTO,
        source: ModelLayout | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        config = components.config
        self.source = source  # the model directory the weights were loaded from (None for presets)
        self.config = config
        self.components = components
        # Identifies the weights an Identity (or an exported engine) was made with.
        self.fingerprint: str = fingerprint or sha256_json({"config": config})
        self.faces = FaceBackend.parse(faces)
        self.faces_dir = self.faces.pack_dir  # an insightface pack, written by save_pretrained
        self._face_analyzer: FaceAnalyzer | None = None
        self.device, self.dtype = device, dtype
        self.encoder_prompt: str = config["pipeline"]["encoder_prompt"]
        self.face_size: int = config["pipeline"]["face_size"]

        unet = components.unet
        self.kv_blocks = wire_unet(unet, config["kv_encoder"])
        self.unet = _place(unet, device, dtype)
        self.has_lcm = has_adapter(unet, LCM_ADAPTER)

        self.tokenizers = (components.tokenizer, components.tokenizer_2)
        self.text_encoders = (_place(components.text_encoder, device, dtype), _place(components.text_encoder_2, device, dtype))
        # The stock SDXL VAE overflows in fp16: keep it in fp32 when its config asks for upcasting.
        vae_dtype = torch.float32 if components.vae.config.force_upcast else dtype
        self.vae = _place(components.vae, device, vae_dtype)
        tiny_vae = _place(components.tiny_vae, device, dtype) if components.tiny_vae is not None else None
        self.decoder = Decoder(self.vae, tiny_vae)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # Latent sides must survive every UNet downsampling.
        self.size_multiple = self.vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)
        self.default_size = unet.config.sample_size * self.vae_scale
        self.clip_size: int = components.image_encoder.config.image_size

        self.cuda_graphs = cuda_graphs
        self._lock = threading.Lock()  # guards the lazily built networks and the K/V cache
        self._face_lock = threading.RLock()  # the face analyzer: started once, one detection at a time
        self._networks: dict[str, Any] = {"adapter": _place(ImageAdapter(components.image_encoder, components.resampler), device, dtype)}
        self._networks_version = 0
        self._graphs = StepGraphs(GRAPH_MEMORY_BYTES)
        self._uncapturable: set[tuple] = set()
        self._kv_cache = IdentityKVCache()
        self._encoder_prompt: tuple[torch.Tensor, torch.Tensor] | None = None
        self._text_graphs = GraphedTextEncoders(self.tokenizers, self.text_encoders)
        self._tables: dict[tuple[str, int], StepTable] = {}

    # ------------------------------------------------------------------ networks
    def _network(self, name: str):
        with self._lock:
            if name not in self._networks:
                self._networks[name] = self._build_network(name)
            return self._networks[name]

    def _build_network(self, name: str):
        if name == "kv_encoder":
            return KVEncoder(materialize(self.unet, (KV_ENCODER_ADAPTER,)), len(self.kv_blocks))
        if name in ("denoiser", "lcm_denoiser"):
            if name == "lcm_denoiser" and not self.has_lcm:
                return None
            unet = materialize(self.unet, (LCM_ADAPTER,) if name == "lcm_denoiser" else ())
            install_freeu(unet)  # on the denoisers' own copies: the K/V-encoder's stage stays plain
            return Denoiser(unet)
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
        faces: str | Path | None = AUTO,
        tiny_vae: str | Path | None = None,
        cuda_graphs: bool = True,
        verify: bool = True,
    ) -> Personalizer:
        """Load an lcmla model directory (see :mod:`lcmla_sdk.model_dir`) or an embedded preset.

        A directory is validated (files, keys, shapes, dtypes) before any weight is read; nothing is downloaded.
        ``verify``: hash every file it records in ``lcmla.json`` and refuse one that changed (hashes are cached by
        file, size and mtime, so a large directory is hashed once); ``verify=False`` skips the hashing.
        ``faces`` picks the face backend (:class:`~lcmla_sdk.faces.FaceBackend`): ``"auto"`` is the directory's
        insightface pack if it has one, else dlib; ``"dlib"``, ``"insightface:DIR"`` (or ``DIR``), ``None`` for no
        detection. ``tiny_vae``: a local diffusers ``AutoencoderTiny`` folder (TAESD-XL) for
        ``generate(..., vae="tiny")``. Presets (``"tiny"``, ``"sdxl"``) have seeded random weights, drawn directly on
        ``device``: ``tiny`` makes noise, not faces; ``sdxl`` is the full architecture for export and benchmarks.
        """
        validation.loading(name, device, dtype, seed, faces, tiny_vae, cuda_graphs, verify)
        device, dtype = default_device_and_dtype(device, dtype)
        if str(name) in PRESETS:
            model = cls.from_config(preset_config(str(name)), device, dtype, seed, str(name), faces, cuda_graphs)
        else:
            if not Path(name).expanduser().is_dir():
                raise ModelFilesError(f"name: {name!r} is neither a model directory nor an embedded preset {PRESETS}")
            layout = checks.validate(name, verify)
            if faces == AUTO and "faces" in layout.components:
                faces = layout.components["faces"].path
            components = loading.load(layout, dtype)
            model = cls(components, device, dtype, layout.fingerprint(), faces, layout, cuda_graphs)
        if tiny_vae is not None:
            model.decoder.tiny_vae = _place(load_tiny_vae(tiny_vae), device, dtype)
        return model

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        label: str = "custom",
        faces: str | Path | None = AUTO,
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
        components = build_random_components(config, seed, dtype, device)
        return cls(components, device, dtype, sha256_json(recipe), faces, cuda_graphs=cuda_graphs)

    def use_exported(self, folder: str | Path, backend: str = "tensorrt", verify: bool = True) -> None:
        """Run the KV-encoder, denoisers and adapter from an export folder (``lcmla export``) instead of PyTorch.

        ``backend`` is ``"tensorrt"`` or ``"tensorrt-rtx"`` (engines, GPU) or ``"onnxruntime"`` (ONNX graphs, CPU).
        The folder's manifest must have been made for this model (its fingerprint) and, for engines, with this backend
        and version, for this GPU.
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
        saving.save(self.components, self.faces_dir, path, linked=self.source if link_frozen else None)
        return Path(path)

    @property
    def has_kv_encoder(self) -> bool:
        """``False`` for a model converted from the authors' no-K/V checkpoint (``encoder_plus_adapter_no_kv.bin``,
        made for their IP-Adapter-only pipeline): it generates without encoder K/V and refuses ``use_kv=True``."""
        return bool(self.config["pipeline"].get("has_kv_encoder", True))

    @property
    def face_analyzer(self) -> FaceAnalyzer | None:
        """The face backend (:attr:`faces`), started on first use; ``None`` when detection is off."""
        with self._face_lock:
            if self._face_analyzer is None:
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else None
                self._face_analyzer = self.faces.open(providers)
            return self._face_analyzer

    # ------------------------------------------------------------------ steps of a generation
    # Checks and normalises the arguments of :meth:`generate` (its own module: lcmla_sdk.request).
    check_inputs = check_request

    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda" and self.cuda_graphs:
            return self._text_graphs(prompts)
        return encode_prompts(prompts, self.tokenizers, self.text_encoders)

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None):
        """``(text, pooled)`` for the prompts and for the negatives (zeros for an absent negative prompt)."""
        text, pooled = self._encode_text(prompts)
        if negatives is None:
            neg_text, neg_pooled = torch.zeros_like(text), torch.zeros_like(pooled)
        else:
            neg_text, neg_pooled = self._encode_text(negatives)
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

        Unless detection is off (``faces=None``), every photo goes through the face backend: the largest face, or
        :class:`NoFaceError` when there is none, or :class:`MultipleFacesError` with ``on_multiple="error"``; the
        identity records each detection (box, landmarks, embedding, backend). ``crop="face"`` feeds the
        5-point-aligned face crop to the image encoder and VAE; ``crop="none"`` the photo. ``face_resize="squash"``
        (the authors') resizes the whole photo to the face size without keeping its aspect ratio; ``"crop"`` takes
        its centre square. Several photos are combined as :mod:`lcmla_sdk.identity` describes.
        """
        faces = list(images) if isinstance(images, (list, tuple)) else [images]
        if not faces:
            raise InvalidImageError("face: no image given")
        validation.choice(crop, "crop", CROPS)
        validation.choice(on_multiple, "on_multiple", ON_MULTIPLE)
        validation.choice(face_resize, "face_resize", FACE_RESIZES)
        validation.check_memory(validation.vae_bytes(self, len(faces), self.face_size, self.face_size), self.device,
                                f"face ({len(faces)} photos)", "encode fewer photos at once")  # fmt: skip
        analyzer = self.face_analyzer
        if analyzer is None and (crop == "face" or on_multiple == "error"):
            raise ModelFilesError(
                "faces: crop='face' and on_multiple='error' need face detection, which is off for this model: "
                "install the dlib backend (pip install 'lcmla[faces]') or pass faces='dlib' or an insightface pack "
                "folder to from_pretrained"
            )
        pictures, sources, detections = [], [], []
        for face in faces:
            image = load_rgb(face)
            sources.append(pixel_sha256(image))
            with self._face_lock:  # the detectors keep per-call state: one photo at a time
                found = analyzer.find_face(image, on_multiple) if analyzer is not None else None
            detections.append(found)
            picture = align_face(image, found.landmarks, self.face_size) if crop == "face" else image
            pictures.append(squash(picture, self.face_size) if face_resize == "squash" else picture)
        clip = torch.cat([clip_pixels(p, self.clip_size) for p in pictures]).to(self.device, self.dtype)
        cond, uncond = self.adapter(clip)
        pixels = torch.cat([vae_pixels(p, self.face_size) for p in pictures]).to(self.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        return Identity(
            cond_tokens=cond.mean(0, keepdim=True), uncond_tokens=uncond[:1], latent_mean=dist.mean.float(),
            latent_std=dist.std.float(), sources=sources, model_fingerprint=self.fingerprint, crop=crop,
            face_resize=face_resize, **detection_fields(detections, analyzer),
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
        """Per-step timesteps and coefficients of a mode's schedule, on the device (:mod:`lcmla_sdk.schedule`);
        built once per (mode, steps)."""
        key = (mode, steps)
        if key not in self._tables:
            scheduler = self.make_scheduler(mode)
            scheduler.set_timesteps(steps)
            self._tables[key] = build_table(scheduler, self.device)
        return self._tables[key]

    def prepare_noise(self, request: Request, face: Identity, table: StepTable) -> Noise:
        """Every random tensor of the generation (:mod:`lcmla_sdk.noise`), on the device."""
        shape = (1, 4, request.height // self.vae_scale, request.width // self.vae_scale)
        return draw_noise(request.seeds, shape, face, table.noise_steps, request.face_noise,
                          self.vae.config.scaling_factor, self.dtype, self.device)  # fmt: skip

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
        use_kv: bool | None = None,
        adapter_scale: float = 1.0,
        output: str = "pil",
        callback: StepCallback | None = None,
        kv_cache: bool = False,
        face_noise: str | None = None,
        vae: str = "full",
        freeu: Sequence[float] | None = AUTHORS_FREEU,
    ):
        """Generate ``num_images`` images per prompt of the person in ``face`` (photo(s), or an :class:`Identity`
        from :meth:`encode_face`, which skips all face work).

        ``mode="quality"``: DPM-Solver++ with three-branch guidance ``guidance`` = (no_kv, full, kv).
        ``mode="fast"``: LCM scheduler with the LCM-LoRA denoiser, conditional branch only. ``steps``: by default
        each mode's in :data:`lcmla_sdk.request.MODES`. ``use_kv=False``: IP-Adapter only, i.e. plain CFG with scale ``no_kv + full``; ``None``: the
        model's default (:attr:`has_kv_encoder`). ``kv_cache=True``: the K/V-encoder's output for this schedule is
        computed once per identity, with the identity's fixed reference noise (``face_noise="fixed"``) instead of
        each image's initial noise (the authors' pairing), and reused by later calls. ``vae="tiny"``: decode with
        the tiny VAE (previews). ``freeu``: (b1, b2, s1, s2) of FreeU on the denoiser, as the authors' README
        enables it (their code changes the second up-stage only, with b2 and s2; :mod:`lcmla_sdk.freeu`); ``None``
        turns it off.
        ``callback(step_index, timestep, latents)`` runs after every step.
        """
        # 1. Check inputs
        request = self.check_inputs(
            prompt, negative_prompt, num_images, seed, mode, steps, guidance, height, width, use_kv,
            adapter_scale, output, callback, kv_cache, face_noise, vae, freeu,
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

    def denoise(self, request: Request, identity: Identity, prompts: tuple, noise: Noise, table: StepTable,
                callback: StepCallback | None = None) -> torch.Tensor:  # fmt: skip
        """The sampling loop from ``noise.latents``: buffers for :func:`lcmla_sdk.sampling.sample`, then its run."""
        text, pooled, neg_text, neg_pooled = prompts
        batch, refs = text.shape[0], identity.num_references
        to = {"device": self.device, "dtype": self.dtype}
        tokens, uncond_tokens = (x.to(**to).expand(batch, -1, -1) for x in (identity.cond_tokens, identity.uncond_tokens))
        spec = StepSpec(request.mode, batch, refs, request.use_kv)
        kv_cache = None
        if request.use_kv and request.kv_cache:
            kv_cache, layout = self.identity_kv(identity, spec, request, table, neg_text[:1], neg_pooled[:1])
            spec = replace(spec, kv_layout=layout)
        blocks = spec.denoiser_blocks
        values = {
            "text": torch.cat([text if cond else neg_text for cond, _ in blocks]),
            "pooled": torch.cat([pooled if cond else neg_pooled for cond, _ in blocks]),
            "time_ids": time_ids(request.height, request.width, spec.denoiser_rows, self.dtype, self.device),
            "image_tokens": torch.cat([tokens if cond else uncond_tokens for cond, _ in blocks]),
            "adapter_scale": torch.full((spec.denoiser_rows,), request.adapter_scale, device=self.device),
        }
        if request.mode == "quality":
            values["guidance"] = torch.tensor(request.guidance, dtype=torch.float32, device=self.device)
        values["latents"] = noise.latents
        if request.freeu is not None:
            values["freeu"] = stage_values(request.freeu, self.device)
        if request.use_kv and kv_cache is None:
            negatives = (neg_text.repeat_interleave(refs, 0), neg_pooled.repeat_interleave(refs, 0))
            enc_text, enc_pooled = self.encoder_rows(*negatives, spec.groups)
            values.update({
                "encoder_text": enc_text, "encoder_pooled": enc_pooled,
                # The authors give the encoder the generation's micro-conditioning, not the face's size.
                "encoder_time_ids": time_ids(request.height, request.width, spec.encoder_rows, self.dtype, self.device),
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
        if not networks.are_torch_modules():
            say_once("exported networks run their own engines: the sampling loop runs eagerly over them")
            return False
        return True

    def warmup(self, mode: str = "fast", num_images: int = 1, height: int | None = None, width: int | None = None,
               references: int = 1, use_kv: bool | None = None, kv_cache: bool = False, steps: int | None = None) -> None:  # fmt: skip
        """Capture the sampling step of one shape (images per call, size, references, K/V options) ahead of the
        first real call, by generating once from a blank identity. Only where the loop is graphed (a CUDA device,
        ``cuda_graphs=True``); elsewhere it returns at once."""
        if self.device.type != "cuda" or not self.cuda_graphs:
            say_once("warmup: nothing to capture (the sampling loop runs eagerly here)", logging.INFO)
            return
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

    def encoder_rows(self, neg_text: torch.Tensor, neg_pooled: torch.Tensor, groups: int):
        """The K/V-encoder's text rows: its prompt for each of the negatives' rows, after those negatives when
        ``groups`` is 2 (quality mode's [uncond, cond])."""
        text, pooled = self.encoder_prompt_embeds(neg_text.shape[0])
        if groups == 1:
            return text, pooled
        return torch.cat([neg_text, text]), torch.cat([neg_pooled, pooled])

    def encoder_prompt_embeds(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V-encoder's prompt, encoded once (it never changes)."""
        with self._lock:
            if self._encoder_prompt is None:
                (text, pooled), _ = self.encode_prompt([self.encoder_prompt], None)
                self._encoder_prompt = (text, pooled)
        text, pooled = self._encoder_prompt
        return text.expand(rows, -1, -1), pooled.expand(rows, -1)

    def compile_decoder(self, cache: str | Path | None = None) -> float:
        """Compile the VAE decode (:meth:`lcmla_sdk.decoding.Decoder.compile`); return the seconds it took."""
        return self.decoder.compile(self.default_size // self.vae_scale, cache)

    def identity_kv(self, identity: Identity, spec: StepSpec, request: Request, table: StepTable, neg_text, neg_pooled):
        """``(K/V per step (steps, G, elements), layout)`` of the identity for this schedule, from the cache
        (:mod:`lcmla_sdk.kv_cache`) or computed with its fixed reference noise."""
        key = (identity.digest(), request.mode, tuple(table.host_timesteps), request.height, request.width,
               str(request.negative_prompts[0]) if request.negative_prompts else None)  # fmt: skip

        def compute():
            refs, groups = spec.references, spec.groups
            eps, noise = fixed_face_noise(identity)
            to = {"device": self.device, "dtype": self.dtype}
            face = face_latents(identity, eps, self.vae.config.scaling_factor).to(**to).repeat(groups, 1, 1, 1)
            text, pooled = self.encoder_rows(neg_text.expand(refs, -1, -1), neg_pooled.expand(refs, -1), groups)
            ids = time_ids(request.height, request.width, spec.identity_encoder_rows, self.dtype, self.device)
            return compute_kv(self.kv_encoder, table, face, noise.to(**to).repeat(groups, 1, 1, 1), text, pooled, ids,
                              groups, self._kv_cache.max_bytes)  # fmt: skip

        return self._kv_cache.get(key, compute)

    def decode(self, latents: torch.Tensor, request_output: str, vae: str = "full"):
        """Latents -> images (:class:`lcmla_sdk.decoding.Decoder`)."""
        return self.decoder(latents, request_output, vae)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """Frozen, eval-mode, on ``device`` in ``dtype``. (``nn.Module.to`` skips a diffusers warning that fires for
    models with no fp32-only modules.)"""
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
