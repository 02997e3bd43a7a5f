"""``LCMLookaheadPipeline``: :class:`~lcmla_sdk.Personalizer` behind diffusers' ``DiffusionPipeline`` interface.

It is a thin adapter: every call runs ``Personalizer.generate`` (the same networks, sampling loop and decoding); this
module only translates diffusers' names and habits (``generator``, ``callback_on_step_end``, ``output_type``,
``.to()``, the scheduler picking the mode). How each diffusers habit maps: docs/DIFFUSERS.md.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, LCMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from . import validation
from .guidance import DEFAULT_GUIDANCE
from .identity import Identity
from .images import FaceInput
from .pipeline import Personalizer
from .request import MODES

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "image_encoder", "resampler",
           "tiny_vae")  # fmt: skip
MODE_OF_SCHEDULER = {DPMSolverMultistepScheduler: "quality", LCMScheduler: "fast"}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# generate's argument names -> this pipeline's, for error messages (which start with the argument's name)
DIFFUSERS_NAMES = {"face": "face_image", "steps": "num_inference_steps", "guidance": "guidance_scale",
                   "num_images": "num_images_per_prompt", "seed": "generator"}  # fmt: skip
NO_OFFLOAD = (
    "{name}: not supported by LCMLookaheadPipeline: the K/V-encoder and both denoisers are views of one UNet (each "
    "with its LoRA merged into its own copies of the layers it adapts, every other weight shared) that the sampling "
    "step runs together (on a GPU, one CUDA graph per step), so accelerate's per-model hooks cannot move them on and "
    "off the GPU. Keep the pipeline on one device (pipe.to('cuda')), or use fp16 and fewer images per call."
)


class LCMLookaheadPipeline(DiffusionPipeline):
    """LCM-Lookahead face personalization on SDXL as a diffusers pipeline, over a :class:`~lcmla_sdk.Personalizer`.

    ``pipe.personalizer`` is the model every call runs; its modules are registered as the pipeline's components
    (``pipe.unet``, ``pipe.vae``, ...). ``pipe.scheduler`` picks the mode: ``DPMSolverMultistepScheduler`` (the
    default) is ``mode="quality"``, ``LCMScheduler`` is ``mode="fast"`` (the LCM-LoRA).
    """

    model_cpu_offload_seq = None  # see NO_OFFLOAD
    _optional_components = ["tiny_vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, personalizer: Personalizer) -> None:
        super().__init__()
        self.personalizer = personalizer
        self._register(personalizer)
        self.register_modules(scheduler=personalizer.make_scheduler("quality"))
        self._num_timesteps = 0

    def _register(self, personalizer: Personalizer) -> None:
        modules = {name: getattr(personalizer.components, name) for name in MODULES}
        modules.update(unet=personalizer.unet, vae=personalizer.vae, tiny_vae=personalizer.decoder.tiny_vae)
        self.register_modules(**modules)

    # ------------------------------------------------------------------ loading, saving, placement
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = "cpu",
        **kwargs: Any,
    ) -> LCMLookaheadPipeline:
        """An lcmla model directory (``lcmla convert`` or :meth:`save_pretrained`), or an embedded preset
        (``"tiny"``, ``"sdxl"``). As in diffusers, it loads on the CPU (in fp32 unless ``torch_dtype``) and
        ``.to("cuda")`` moves it; ``device="cuda"`` loads there directly. Other keyword arguments go to
        :meth:`Personalizer.from_pretrained` (``faces``, ``tiny_vae``, ``cuda_graphs``, ``verify``, ``seed``)."""
        dtype = torch_dtype if torch_dtype is not None else (torch.float32 if str(device) == "cpu" else None)
        return cls(Personalizer.from_pretrained(pretrained_model_name_or_path, device=device, dtype=dtype, **kwargs))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write an lcmla model directory (safetensors + ``lcmla.json``) that :meth:`from_pretrained` loads.
        diffusers' serialisation options (``safe_serialization``, ``variant``, ...) have no effect: the format is
        always safetensors, with hashes in ``lcmla.json``."""
        self.personalizer.save_pretrained(save_directory)

    def to(self, *args: Any, **kwargs: Any) -> LCMLookaheadPipeline:
        """``to(device)``, ``to(dtype)``, ``to(device, dtype)`` or ``to(device=..., dtype=...)``, as in diffusers.
        The model is rebuilt on the new device over the same modules (moved in place; a VAE that must upcast stays in
        fp32), keeping its fingerprint, face backend and tiny VAE; networks installed by ``use_exported`` are not
        carried over."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        kwargs.pop("silence_dtype_warnings", None)
        if kwargs or len(args) > 2:
            raise ValueError(f"to: expected a device and/or a dtype, got {args} {kwargs}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif arg is not None:
                device = arg
        old = self.personalizer
        device = validation.device(device) if device is not None else old.device
        dtype = dtype or old.dtype
        if (device, dtype) == (old.device, old.dtype):
            return self
        components = replace(old.components, tiny_vae=old.decoder.tiny_vae)
        # The same face backend, started again on first use.
        moved = Personalizer(components, device, dtype, old.fingerprint, old.faces, old.source, old.cuda_graphs)
        self.personalizer = moved
        self._register(moved)
        return self

    @property
    def device(self) -> torch.device:
        return self.personalizer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.personalizer.dtype

    @property
    def components(self) -> dict[str, Any]:
        """The registered modules and the scheduler. (A pipeline over the same weights:
        ``LCMLookaheadPipeline(pipe.personalizer)``.)"""
        return {name: getattr(self, name) for name in (*MODULES, "scheduler")}

    def enable_model_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(NO_OFFLOAD.format(name="enable_model_cpu_offload"))

    def enable_sequential_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(NO_OFFLOAD.format(name="enable_sequential_cpu_offload"))

    @property
    def num_timesteps(self) -> int:
        """Steps of the current (or last) call, for callbacks."""
        return self._num_timesteps

    # ------------------------------------------------------------------ the call
    def mode(self) -> str:
        """The mode ``pipe.scheduler`` stands for; its configuration must be the model's (the sampling loop runs the
        model's two schedules as precomputed per-step coefficients, :mod:`lcmla_sdk.schedule`)."""
        kind = type(self.scheduler)
        if kind not in MODE_OF_SCHEDULER:
            raise ValueError(
                f"scheduler: {kind.__name__} is not supported; use DPMSolverMultistepScheduler (mode 'quality') or "
                f"LCMScheduler (mode 'fast', the LCM-LoRA), e.g. LCMScheduler.from_config(pipe.scheduler.config)"
            )
        mode = MODE_OF_SCHEDULER[kind]
        own = self.personalizer.make_scheduler(mode).config
        changed = sorted(k for k, v in own.items() if not k.startswith("_") and self.scheduler.config.get(k) != v)
        if changed:
            raise ValueError(f"scheduler: {kind.__name__} must keep the model's configuration; changed: {changed}")
        return mode

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        face_image: FaceInput | Sequence[FaceInput] | None = None,
        identity: Identity | str | os.PathLike | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: Sequence[float] = DEFAULT_GUIDANCE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        use_kv: bool | None = None,
        adapter_scale: float = 1.0,
    ):
        """Images of the person in ``face_image`` (photo(s), as ``Personalizer.generate`` takes them) or
        ``identity`` (an :class:`Identity` or an identity file), through ``Personalizer.generate``.

        ``guidance_scale``: the three weights (no_kv, full, kv) of the authors' guidance (quality mode; fast mode
        has none). ``generator``: one for every image (drawn from in turn) or one per image; a generator seeded
        with ``s`` gives the image ``Personalizer.generate(..., seed=s)`` gives. ``num_inference_steps``: the
        mode's default (50 quality, 4 fast) when ``None``. ``output_type``: ``"pil"`` (list of images), ``"np"``
        (float32 array (B, H, W, 3) in [0, 1]), ``"pt"`` (float tensor (B, 3, H, W) in [0, 1]) or ``"latent"``.
        ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`` runs after every step with the tensors
        named in ``callback_on_step_end_tensor_inputs`` (``"latents"``); latents in the dict it returns continue
        the loop. Returns ``StableDiffusionXLPipelineOutput(images=...)``, or ``(images,)`` with
        ``return_dict=False``.
        """
        try:
            # 1. Check the arguments only diffusers has (generate checks the rest)
            mode = self.mode()
            face = self._face(face_image, identity)
            if output_type not in OUTPUT_TYPES:
                raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
            if isinstance(guidance_scale, numbers.Number):
                raise ValueError(
                    "guidance_scale: LCM-Lookahead's guidance has three weights (no_kv, full, kv), e.g. (3.0, 2.0, "
                    "2.0) (the default); one number would be ambiguous"
                )
            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
            unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs))
            if unknown:
                raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not in {self._callback_tensor_inputs}")
            steps = validation.steps(num_inference_steps, mode, MODES[mode])
            if generator is not None and not isinstance(generator, torch.Generator):
                generator = list(generator)
            self._num_timesteps = steps

            # 2. Generate (Personalizer.generate), reporting every step to the progress bar and the callback
            with self.progress_bar(total=steps) as bar:

                def on_step(index: int, timestep: int, latents: torch.Tensor) -> torch.Tensor | None:
                    bar.update()
                    if callback_on_step_end is None:
                        return None
                    given = {"latents": latents} if "latents" in callback_on_step_end_tensor_inputs else {}
                    return (callback_on_step_end(self, index, timestep, given) or {}).get("latents")

                images = self.personalizer.generate(
                    face, prompt, negative_prompt=negative_prompt, num_images=num_images_per_prompt, seed=generator, mode=mode,
                    steps=steps, guidance=guidance_scale, height=height, width=width, use_kv=use_kv,
                    adapter_scale=adapter_scale, output="pt" if output_type == "np" else output_type, callback=on_step,
                )  # fmt: skip
        except ValueError as error:
            raise _in_diffusers_names(error) from None

        # 3. diffusers' output types
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)

    def _face(self, face_image, identity) -> Any:
        if (face_image is None) == (identity is None):
            raise ValueError("face_image/identity: give exactly one: photo(s) of the person, or an Identity (or file)")
        if identity is None:
            return face_image
        if isinstance(identity, Identity):
            return identity
        return self.personalizer.load_identity(Path(identity))


def _in_diffusers_names(error: ValueError) -> ValueError:
    """The same error, its message starting with this pipeline's name of the argument instead of generate's."""
    message = str(error)
    name, colon, rest = message.partition(":")
    names = name.split("/")  # several arguments checked together: "num_images/height/width: ..."
    if not colon or not set(names) & set(DIFFUSERS_NAMES) or len(error.args) != 1:
        return error
    return type(error)("/".join(DIFFUSERS_NAMES.get(n, n) for n in names) + f":{rest}")
