"""``Personalizer``: one face photo + a prompt -> new images of that person (LCM-Lookahead on SDXL)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import validation
from .compiling import AheadOfTime
from .cuda_graphs import say_once
from .decoding import Decoder
from .faces import AUTO, FaceAnalyzer, FaceBackend
from .faces.encoding import FaceEncoder
from .identity import Identity, identities_per_prompt
from .images import FaceInput
from .integrity import sha256_json
from .kv_cache import AHEAD_ROWS, ahead_kv
from .model_dir import loading, saving
from .model_dir.format import ModelLayout
from .network_set import NetworkSet
from .networks import ImageAdapter
from .noise import StepNoise, draw_per_prompt
from .presets import Components
from .request import Request
from .sampling import StepInputs, StepSpec, step_values
from .schedule import StepTable, StepTables, make_scheduler
from .text import PromptEncoder
from .warmup import warm_up


class Personalizer:
    """Encoder-based face personalization with LCM-Lookahead's KV-encoder, denoiser and image adapter.

    The sampling loop calls the networks through their tensor interfaces (:mod:`lcmla_sdk.networks`):
    ``self.kv_encoder``, ``self.denoiser`` / ``self.lcm_denoiser`` and ``self.adapter``. The UNet networks are built
    on first use from the peft UNet ``self.unet`` (:class:`~lcmla_sdk.network_set.NetworkSet`); after changing
    ``self.unet``'s weights, call :meth:`rebuild_networks`.

    On a CUDA device the sampling step is captured in a CUDA graph per shape and replayed (``cuda_graphs=False``
    runs it eagerly); concurrent calls are safe: the graph loop holds a lock for the loop only.
    """

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype, fingerprint: str | None = None,
                 faces: str | Path | FaceBackend | None = AUTO, source: ModelLayout | None = None,
                 cuda_graphs: bool = True) -> None:  # fmt: skip
        """``components`` as the loaders give them (:mod:`lcmla_sdk.model_dir.loading`: the UNet wired)."""
        config = self.config = components.config
        self.components, self.source = components, source  # source: the model directory (None for random weights)
        # Identifies the weights an Identity (or an exported engine) was made with.
        self.fingerprint: str = fingerprint or sha256_json({"config": config})
        self.faces = FaceBackend.parse(faces)
        self.faces_dir = self.faces.pack_dir  # an insightface pack, written by save_pretrained
        self.device, self.dtype, self.cuda_graphs = device, dtype, cuda_graphs
        self.encoder_prompt: str = config["pipeline"]["encoder_prompt"]
        self.face_size: int = config["pipeline"]["face_size"]

        loading.place_on_device(components, device, dtype)
        self.unet, self.vae = components.unet, components.vae
        adapter = ImageAdapter(components.image_encoder, components.resampler).eval()
        self._networks = NetworkSet(self.unet, adapter)
        self.kv_blocks, self.has_lcm = self._networks.kv_blocks, self._networks.has_lcm
        self.tokenizers = (components.tokenizer, components.tokenizer_2)
        self.text_encoders = (components.text_encoder, components.text_encoder_2)
        self.prompt_encoder = PromptEncoder(self.tokenizers, self.text_encoders, self.encoder_prompt)
        self.decoder = Decoder(self.vae, components.tiny_vae)
        self.vae_scale = validation.vae_scale(self.vae.config)
        self.size_multiple = validation.size_multiple(self.unet.config, self.vae.config)
        self.default_size = self.unet.config.sample_size * self.vae_scale
        self.clip_size: int = components.image_encoder.config.image_size
        self.face_encoder = FaceEncoder(self.faces, self.vae, self.clip_size, self.face_size, self.fingerprint, device, dtype)

        self.step_tables = StepTables(config["scheduler"], device)
        self.step_graphs, self.identity_kv_cache = self._networks.step_graphs, self._networks.kv_cache
        # Encoder rows batched in one pass when every step's K/V are computed ahead (none on a CPU: nothing to gain).
        self.kv_ahead_rows = AHEAD_ROWS if device.type == "cuda" else 0

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, name: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, seed: int = 0, faces: str | Path | None = AUTO,
                        tiny_vae: str | Path | None = None, cuda_graphs: bool = True, verify: bool = True,
                        compiled: str | Path | None = None,
                        compiled_fallback: bool = False) -> Personalizer:  # fmt: skip
        """Load an lcmla model directory (see :mod:`lcmla_sdk.model_dir`) or an embedded preset.

        A directory is validated (files, keys, shapes, dtypes) before any weight is read; nothing is downloaded.
        ``verify``: hash every file it records in ``lcmla.json`` and refuse one that changed (hashes are cached by
        file, size and mtime, so a large directory is hashed once); ``verify=False`` skips the hashing.
        ``faces`` picks the face backend (:class:`~lcmla_sdk.faces.FaceBackend`): ``"auto"`` is the directory's
        insightface pack if it has one, else dlib; ``"dlib"``, ``"insightface:DIR"`` (or ``DIR``), ``None`` for no
        detection. ``tiny_vae``: a local diffusers ``AutoencoderTiny`` folder (TAESD-XL) for
        ``generate(..., vae="tiny")``. Presets (``"tiny"``, ``"sdxl"``) have seeded random weights, drawn directly on
        ``device``: ``tiny`` makes noise, not faces; ``sdxl`` is the full architecture for export and benchmarks.
        ``compiled``: a folder built by ``lcmla export --backend torch`` for this model, GPU and PyTorch
        (:meth:`use_exported`); one made for anything else is refused, or with ``compiled_fallback=True`` skipped with
        a warning (the networks then run uncompiled).
        """
        validation.loading(name, device, dtype, seed, faces, tiny_vae, cuda_graphs, verify)
        device, dtype = loading.device_and_dtype(device, dtype)
        loaded = loading.load_model(name, device, dtype, seed, faces, tiny_vae, verify)
        model = cls(loaded.components, device, dtype, loaded.fingerprint, loaded.faces, loaded.source, cuda_graphs)
        if compiled is not None:
            from .engines.compiled import load_compiled

            load_compiled(model, compiled, verify, fallback=compiled_fallback)
        return model

    @classmethod
    def from_config(cls, config: dict[str, Any], device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, seed: int = 0, label: str = "custom",
                    faces: str | Path | None = AUTO, cuda_graphs: bool = True) -> Personalizer:  # fmt: skip
        """Random weights for an architecture given as constructor arguments (the presets' JSON format).

        Weights are drawn directly on ``device`` in ``dtype`` (no fp32 copy, no host-to-device transfer), so the
        same config, seed, dtype and device kind give the same weights on every run of one machine (the CPU's and a
        GPU's random streams differ, so the device kind is part of the fingerprint).
        """
        device, dtype = loading.device_and_dtype(device, dtype)
        model = loading.random_model(label, device, dtype, seed, faces, config)
        return cls(model.components, device, dtype, model.fingerprint, model.faces, cuda_graphs=cuda_graphs)

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

    # ------------------------------------------------------------------ networks
    kv_encoder = property(lambda self: self._networks["kv_encoder"], doc="The K/V-encoder (kv_encoder LoRA merged).")
    denoiser = property(lambda self: self._networks["denoiser"], doc="The authors' decoder: no adapter.")
    lcm_denoiser = property(lambda self: self._networks["lcm_denoiser"], doc="The denoiser with the LCM-LoRA merged.")
    adapter = property(lambda self: self._networks["adapter"], doc="CLIP vision tower + IP-Adapter resampler.")

    def rebuild_networks(self, **replacements: Any) -> None:
        """Drop the built networks (they are rebuilt from ``self.unet`` on next use), captured graphs and K/V caches;
        ``replacements`` (``kv_encoder=...``) install networks with the same call signatures instead."""
        self._networks.replace(**replacements)

    def compile_networks(self, ahead: AheadOfTime | None = None) -> None:
        """From now on run the K/V-encoder and the denoisers compiled whole by ``torch.compile``
        (:mod:`lcmla_sdk.compiling`): by the functions in ``ahead`` at the call shapes they were built for (a folder
        built by ``lcmla export --backend torch``, :meth:`use_exported`: seconds to load), else each shape compiles
        on its first call (minutes)."""
        self._networks.compile(ahead)

    def use_exported(self, folder: str | Path, backend: str = "tensorrt", verify: bool = True) -> None:
        """Run the KV-encoder, denoisers and adapter from an export folder (``lcmla export``) instead of PyTorch.

        ``backend`` is ``"tensorrt"`` or ``"tensorrt-rtx"`` (engines, GPU), ``"onnxruntime"`` (ONNX graphs, CPU) or ``"torch"``
        (functions compiled ahead of time by ``torch.compile``: the networks inside the graphed sampling step and the
        VAE decode, :mod:`lcmla_sdk.engines.compiled`). The folder's manifest must have been made for this model (its
        fingerprint) and, for engines and torch, this GPU and these versions. Over exported graphs the sampling
        loop runs eagerly (TensorRT engines are graph-free already). ``verify``: check the sha256 of every file the
        backend loads against the manifest first (cached like model directories').
        """
        from .engines.runtime import use_exported

        use_exported(self, folder, backend, verify)

    # ------------------------------------------------------------------ the call
    @torch.inference_mode()
    def generate(self, face: FaceInput | Sequence[FaceInput] | Identity, prompt: str | Sequence[str], **options: Any):
        """Generate ``num_images`` images per prompt of the person in ``face`` (photo(s), or an :class:`Identity`
        from :meth:`encode_face`, which skips all face work), or of one person per prompt: ``face`` a list with one
        entry per prompt, each an :class:`Identity` or a list of photos, all with as many reference photos. Each
        prompt's images have their own image tokens and K/V, and equal those of a call with that prompt alone.

        ``options``: the keywords of :class:`lcmla_sdk.request.Request` (``negative_prompt``, ``num_images``,
        ``seed``, ``mode``, ``steps``, ``guidance``, ``height``, ``width``, ``use_kv``, ``adapter_scale``,
        ``output``, ``callback``, ``kv_cache``, ``face_noise``, ``vae``, ``freeu``), where each is described.
        """
        # 1. Check inputs
        request = Request.from_call(self, prompt=prompt, **options)

        # 2. Encode each face once (image tokens and VAE latents), or take ready Identities: one per prompt. First:
        # checking an identity reads its values, which waits for the GPU's queued work.
        identities = self.prompt_identities(face, len(request.prompt))

        # 3. Encode prompts (one row per prompt)
        prompts = self.encode_prompt(request.prompt, request.negative_prompt)

        # 4. Schedule and every random draw (each image from its own generator: drawn per prompt, as in one draw)
        table = self.step_tables(request.mode, request.steps)
        shape = (1, 4, request.height // self.vae_scale, request.width // self.vae_scale)
        noise = draw_per_prompt(request.seed, identities, shape, table.noise_steps, request.face_noise,
                                self.vae.config.scaling_factor, self.dtype, self.device)  # fmt: skip

        # 5. Denoising loop (a CUDA graph per shape on a GPU), from the call's inputs by name, one row per image
        inputs = request.step_inputs(identities, prompts, noise, self.prompt_encoder.encoder_prompt, self.device, self.dtype)
        latents = self.denoise(request, identities, inputs, table, noise.steps)

        # 6. Decode
        return self.decode(latents, request.output, request.vae)

    def prompt_identities(self, face: FaceInput | Sequence[FaceInput] | Identity | Sequence, prompts: int) -> list[Identity]:
        """The :class:`Identity` of each prompt: ``face`` for all of them, or ``face[i]`` for prompt ``i`` when
        ``face`` is a list of Identities or of photo lists (a list of photos is one person's)."""
        return identities_per_prompt(face, prompts, partial(validation.identity, self), self.encode_face)

    @torch.inference_mode()
    def encode_face(self, images: FaceInput | Sequence[FaceInput], crop: str = "none", on_multiple: str = "largest",
                    face_resize: str = "squash") -> Identity:  # fmt: skip
        """Encode one or several photos of one person into an :class:`Identity` (reusable for any prompt).

        Unless detection is off (``faces=None``), every photo goes through the face backend: the largest face, or
        :class:`NoFaceError` when there is none, or :class:`MultipleFacesError` with ``on_multiple="error"``; the
        identity records each detection (box, landmarks, embedding, backend). ``crop="face"`` feeds the
        5-point-aligned face crop to the image encoder and VAE; ``crop="none"`` the photo. ``face_resize="squash"``
        (the authors') resizes the whole photo to the face size without keeping its aspect ratio; ``"crop"`` takes
        its centre square. Several photos are combined as :mod:`lcmla_sdk.identity` describes.
        """
        return self.face_encoder(images, self.adapter, crop, on_multiple, face_resize)

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None):
        """``(text, pooled)`` for the prompts and for the negatives (zeros for an absent negative prompt)."""
        return self.prompt_encoder(prompts, negatives, self._graphed)

    def denoise(self, request: Request, identities: list[Identity], inputs: StepInputs, table: StepTable,
                step_noise: StepNoise | None) -> torch.Tensor:  # fmt: skip
        """The sampling loop (:func:`lcmla_sdk.sampling.sample`) from ``inputs.latents``, with every step's K/V
        computed ahead (:mod:`lcmla_sdk.kv_cache`) when they are cached per identity or one pass covers them."""
        spec = StepSpec(request.mode, inputs.latents.shape[0], identities[0].num_references, request.use_kv)
        kv = None
        if request.use_kv:  # only then: the K/V-encoder is built (a merged copy of the UNet) on first use
            kv, spec = ahead_kv(self.kv_encoder, self.identity_kv_cache, request, identities, spec, table, inputs,
                                self.vae.config.scaling_factor, self.kv_ahead_rows)  # fmt: skip
        if self.device.type != "cuda":
            say_once("CUDA graphs need a CUDA device: the sampling loop runs eagerly", logging.INFO)
        values = step_values(spec, inputs, None if kv is None else kv.rows)
        return self._networks.sample(spec, values, table, step_noise, kv, self._graphed, request.callback)

    @property
    def _graphed(self) -> bool:
        """Whether CUDA graphs are used: on a CUDA device, unless ``cuda_graphs`` is off."""
        return self.device.type == "cuda" and self.cuda_graphs

    # ------------------------------------------------------------------ around the call
    def load_identity(self, path: str | Path) -> Identity:
        """:meth:`Identity.load` that refuses an identity made by another model."""
        return Identity.load(path, expected_fingerprint=self.fingerprint)

    def make_scheduler(self, mode: str):
        """The diffusers scheduler of a mode (:func:`lcmla_sdk.schedule.make_scheduler`)."""
        return make_scheduler(self.config["scheduler"], mode)

    def warmup(self, mode: str = "fast", num_images: int = 1, height: int | None = None, width: int | None = None,
               references: int = 1, use_kv: bool | None = None, kv_cache: bool = False, steps: int | None = None,
               compile: bool = False, progress: bool = True) -> bool:  # fmt: skip
        """Prepare one shape (images per call, size, references, K/V options) ahead of the first real call, by
        generating once from a blank identity: capture its sampling step where the loop is graphed (a CUDA device,
        ``cuda_graphs=True``) and, with ``compile=True``, compile the networks (:meth:`compile_networks`) and the
        VAE decode first, under a progress display (``progress``). Without either it returns ``False`` at once."""
        return warm_up(self, self._graphed, references, compile, progress, mode=mode, num_images=num_images,
                       steps=steps, height=height, width=width, use_kv=use_kv, kv_cache=kv_cache)  # fmt: skip

    def compile_decoder(self, cache: str | Path | None = None) -> float:
        """Compile the VAE decode (:meth:`lcmla_sdk.decoding.Decoder.compile`); return the seconds it took."""
        return self.decoder.compile(self.default_size // self.vae_scale, cache)

    def decode(self, latents: torch.Tensor, output: str, vae: str = "full"):
        """Latents -> images (:class:`lcmla_sdk.decoding.Decoder`)."""
        return self.decoder(latents, output, vae)

    @property
    def face_analyzer(self) -> FaceAnalyzer | None:
        """The face backend (:attr:`faces`), started on first use; ``None`` when detection is off."""
        return self.face_encoder.analyzer
