"""``lcmla convert``: the authors' released weights (or SDXL + an IP-Adapter file) -> an lcmla model directory.

The authors' ``encoder_plus_adapter_ckpt.bin`` (and ``encoder_plus_adapter_no_kv.bin``) is the ``state_dict`` of
their adapter wrapper; every key is accounted for:

=====================================================================  ==============================================
``encoder_unet.<k>`` (SDXL base keys)                                  checked equal to the SDXL base UNet; lcmla
                                                                       shares that one UNet, so they are not stored
``encoder_unet.<blk>.extract_kv{1,2}.source_attention_block.*``        aliases of ``<blk>.attn{1,2}.*``: checked
                                                                       equal, dropped
``encoder_unet.<blk>.attn{1,2}.<proj>.lora_layer.{down,up}.weight``    ``kv_encoder`` peft LoRA ``lora_A``/``lora_B``
``encoder_unet.<blk>.extract_kv1.to_{k,v}.weight``                     ``<blk>.attn1.processor.to_{k,v}_kv``
``encoder_unet.<blk>.extract_kv1.to_{k,v}.lora_layer.*``               their LoRA (or fused in, ``fuse_kv_lora``)
``encoder_unet.<blk>.extract_kv2.to_{k,v}.weight``                     ``<blk>.attn2.processor.to_{k,v}_ip``
``image_encoder.*``                                                    the CLIP image encoder
``image_proj_model.*``                                                 the resampler (diffusers' IP-Adapter renaming)
=====================================================================  ==============================================

Anything else (after an optional ``module.`` prefix) is an error that lists the keys. The attention LoRA cannot be
fused: the encoder and the denoiser share one UNet, and the denoiser must not see it.

The no-K/V checkpoint has the same keys (its ``extract_kv1`` weights exist but their pipeline never reads them), so
only its file name tells it apart: a model converted from it is marked ``"has_kv_encoder": false`` in ``lcmla.json``
and generates with the IP-Adapter only (``Personalizer.has_kv_encoder``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .errors import ModelFilesError
from .model_dir.building import assemble, load_sdxl
from .model_dir.saving import save
from .schema import read_json
from .weights import (
    check_shapes,
    first_keys,
    load_image_proj,
    load_ip_adapter,
    load_module_state,
    read_state_dict,
    resampler_config_from_ip_adapter,
    shapes,
)
from .wiring import LookaheadWeights, base_unet_state

ENCODER, IMAGE_ENCODER, IMAGE_PROJ = "encoder_unet.", "image_encoder.", "image_proj_model."
# Files of a directory of the authors' components (their save hook, or accelerate's save_state).
CHECKPOINT_PATTERNS = ("model_ckpt.pt", "pytorch_model*.bin", "model*.safetensors", "encoder_plus_adapter*.bin")
EXTRACT = re.compile(r"(?P<block>.+)\.extract_kv(?P<which>[12])\.to_(?P<kv>[kv])\.(?P<rest>weight|lora_layer\.(?P<side>down|up)\.weight)")
LORA = re.compile(r"(?P<module>.+)\.lora_layer\.(?P<side>down|up)\.weight")
LORA_SIDE = {"down": "lora_A", "up": "lora_B"}


@dataclass
class MappedCheckpoint:
    """The authors' state dict sorted into lcmla's components (keys already in lcmla's names)."""

    base: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    kv_projections: dict[str, torch.Tensor] = field(default_factory=dict)
    ip_kv: dict[str, torch.Tensor] = field(default_factory=dict)
    image_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    image_proj: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: int = 0
    fused_lora: int = 0

    def counts(self) -> dict[str, int]:
        return {
            "SDXL base keys (checked equal to the base UNet, shared)": len(self.base),
            "alias keys (checked equal, dropped)": self.aliases,
            "KV-encoder LoRA": len(self.lora), "K/V projections' LoRA (fused into them)": self.fused_lora,
            "K/V projections (extract_kv1)": len(self.kv_projections),
            "IP K/V (extract_kv2)": len(self.ip_kv), "image encoder": len(self.image_encoder),
            "resampler (image_proj_model)": len(self.image_proj),
        }  # fmt: skip

    def lookahead_weights(self, checkpoint: str | Path) -> LookaheadWeights:
        """The K/V-encoder's and IP-Adapter's weights on the UNet, named by where they were in ``checkpoint``."""
        sources = {"ip_kv": f"{checkpoint} (extract_kv2)", "kv_projections": f"{checkpoint} (extract_kv1)",
                   "kv_lora": str(checkpoint)}  # fmt: skip
        return LookaheadWeights(self.ip_kv, self.kv_projections, self.lora, sources)

    def ranks(self) -> dict[str, int]:
        """``lora_rank`` of the attention LoRA and ``kv_lora_rank`` of the K/V projections' LoRA (0: fused)."""
        attn = [v.shape[0] for k, v in self.lora.items() if k.endswith("lora_A.weight") and "_kv." not in k]
        kv = [v.shape[0] for k, v in self.lora.items() if k.endswith("lora_A.weight") and "_kv." in k]
        return {"lora_rank": attn[0] if attn else 4, "kv_lora_rank": kv[0] if kv else 0}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The authors' state dict from one file, or from a folder of their component files (keys must not clash)."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted({f for pattern in CHECKPOINT_PATTERNS for f in path.glob(pattern)})
        if not files:
            raise ModelFilesError(f"{path}: no checkpoint files ({', '.join(CHECKPOINT_PATTERNS)})")
    else:
        raise ModelFilesError(f"{path}: no such checkpoint file or folder")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = read_state_dict(file)
        nested = [key for key, value in part.items() if not isinstance(value, torch.Tensor)]
        if nested:
            raise ModelFilesError(f"{file}: not a flat state dict of tensors; these keys hold something else: {first_keys(nested)}")
        for key, value in part.items():
            key = key.removeprefix("module.")
            if key in state and not torch.equal(state[key], value):
                raise ModelFilesError(f"{file}: key {key} differs from the same key in another file of {path}")
            state[key] = value
    return state


def map_checkpoint(state: dict[str, torch.Tensor], fuse_kv_lora: bool = False) -> MappedCheckpoint:
    """Sort every key (see the module docstring); unmapped keys and unequal aliases are errors listing them."""
    mapped, unmapped, unequal = MappedCheckpoint(), [], []
    for key, value in state.items():
        if key.startswith(IMAGE_ENCODER):
            mapped.image_encoder[key[len(IMAGE_ENCODER) :]] = value
        elif key.startswith(IMAGE_PROJ):
            mapped.image_proj[key[len(IMAGE_PROJ) :]] = value
        elif not key.startswith(ENCODER):
            unmapped.append(key)
        elif ".source_attention_block." in key:
            canonical = re.sub(r"extract_kv([12])\.source_attention_block\.", r"attn\1.", key)
            if canonical not in state or not torch.equal(state[canonical], value):
                unequal.append(key)
            mapped.aliases += 1
        else:
            _map_encoder_key(key[len(ENCODER) :], value, mapped, unmapped)
    if unmapped:
        raise ModelFilesError(f"checkpoint: {len(unmapped)} keys map to nothing in lcmla: {first_keys(unmapped)}")
    if unequal:
        raise ModelFilesError(f"checkpoint: {len(unequal)} alias keys differ from the weights they alias: {first_keys(unequal)}")
    if fuse_kv_lora:
        _fuse_kv_lora(mapped)
    return mapped


def _map_encoder_key(name: str, value: torch.Tensor, mapped: MappedCheckpoint, unmapped: list[str]) -> None:
    match = EXTRACT.fullmatch(name)
    if match:
        block, kv, side = match["block"], match["kv"], match["side"]
        if match["which"] == "2":
            if side:
                unmapped.append(ENCODER + name)  # extract_kv2 is trained in full; it never had a LoRA
            else:
                mapped.ip_kv[f"{block}.to_{kv}_ip.weight"] = value
        elif side:
            mapped.lora[f"{block}.attn1.processor.to_{kv}_kv.{LORA_SIDE[side]}.weight"] = value
        else:
            mapped.kv_projections[f"{block}.to_{kv}_kv.weight"] = value
        return
    match = LORA.fullmatch(name)
    if match:
        mapped.lora[f"{match['module']}.{LORA_SIDE[match['side']]}.weight"] = value
    else:
        mapped.base[name] = value


def _fuse_kv_lora(mapped: MappedCheckpoint) -> None:
    """W_kv <- W_kv + up @ down (the authors' LoRA has no alpha: scale 1), computed in float32."""
    for key, weight in list(mapped.kv_projections.items()):
        block, projection, _ = key.rsplit(".", 2)
        names = [f"{block}.attn1.processor.{projection}.{side}.weight" for side in ("lora_A", "lora_B")]
        missing = [name for name in names if name not in mapped.lora]
        if missing:
            raise ModelFilesError(f"checkpoint: no extract_kv1 LoRA to fuse into {key}: missing {first_keys(missing)}")
        down, up = (mapped.lora.pop(name) for name in names)
        mapped.kv_projections[key] = (weight.float() + up.float() @ down.float()).to(weight.dtype)
        mapped.fused_lora += 2


def is_no_kv_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is the authors' ``encoder_plus_adapter_no_kv.bin`` (or a folder holding it, or named so)."""
    path = Path(path).expanduser()
    names = [path.name] + ([f.name for f in path.iterdir()] if path.is_dir() else [])
    return any("no_kv" in name.lower() for name in names)


def check_base_equal(base: dict[str, torch.Tensor], unet: torch.nn.Module) -> None:
    """The encoder's frozen base must be the SDXL base UNet's own weights: compared exactly, in the lower precision
    of the two."""
    plain = base_unet_state(unet)
    check_shapes(shapes(plain), shapes(base), "checkpoint encoder_unet (against the SDXL base UNet)")
    differ = []
    for key, value in base.items():
        reference = plain[key]
        low = value.dtype if value.element_size() < reference.element_size() else reference.dtype
        if not torch.equal(value.to(low), reference.to(low)):
            differ.append(key)
    if differ:
        raise ModelFilesError(
            f"checkpoint: {len(differ)} encoder_unet base weights differ from the SDXL base UNet ({first_keys(differ)}); "
            "lcmla shares the base UNet between encoder and denoiser, so they must be SDXL base"
        )


def convert(
    out: str | Path,
    sdxl: str | Path,
    image_encoder: str | Path,
    checkpoint: str | Path | None = None,
    ip_adapter: str | Path | None = None,
    lcm_lora: str | Path | None = None,
    vae: str | Path | None = None,
    faces: str | Path | None = None,
    fuse_kv_lora: bool = False,
    dtype: torch.dtype = torch.float16,
    variant: str | None = None,
    kv_encoder: bool | None = None,
) -> dict[str, int]:
    """Write an lcmla model directory at ``out``; return how many keys went where.

    With ``checkpoint`` (the authors' file or folder) the adapter and KV-encoder come from it, and
    ``image_encoder`` needs only its ``config.json``. Without it, ``ip_adapter`` (an original IP-Adapter Plus-Face
    file) and the image encoder's weights start an untrained KV-encoder (initialised as the authors do).
    ``kv_encoder=False`` marks the checkpoint as the authors' no-K/V one; ``None`` decides by its name
    (:func:`is_no_kv_checkpoint`).
    """
    if (checkpoint is None) == (ip_adapter is None):
        raise ModelFilesError("convert: give exactly one of --checkpoint (the authors' weights) or --ip-adapter")
    sdxl, image_encoder = Path(sdxl).expanduser(), Path(image_encoder).expanduser()
    for folder in (sdxl / "unet", sdxl / "vae", sdxl / "text_encoder", sdxl / "text_encoder_2", image_encoder):
        if not (folder / "config.json").is_file():
            raise ModelFilesError(f"{folder / 'config.json'}: missing (SDXL base in diffusers layout, CLIP image encoder)")
    mapped = map_checkpoint(read_checkpoint(checkpoint), fuse_kv_lora) if checkpoint is not None else None
    parts = load_sdxl(sdxl, None, variant, Path(vae).expanduser() if vae else None)
    unet = parts["unet"]
    if mapped is not None:
        check_base_equal(mapped.base, unet)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(image_encoder, local_files_only=True))
        load_module_state(clip, mapped.image_encoder, f"{checkpoint} (image_encoder)")
        resampler_config = resampler_config_from_ip_adapter(mapped.image_proj, Path(checkpoint))
        resampler = IPAdapterPlusImageProjection(**resampler_config)
        load_image_proj(mapped.image_proj, unet, resampler, f"{checkpoint} (image_proj_model)")
        kv_config, added, counts = mapped.ranks(), mapped.lookahead_weights(checkpoint), mapped.counts()
    else:
        clip = CLIPVisionModelWithProjection.from_pretrained(image_encoder, local_files_only=True)
        ip_adapter_parts = load_ip_adapter(ip_adapter, unet)
        resampler, resampler_config = ip_adapter_parts.resampler, ip_adapter_parts.resampler_config
        # An untrained KV-encoder, initialised as the authors do: K/V projections copied from attn1, seeded LoRA.
        kv_config = {"lora_rank": 4, "kv_lora_rank": 4}
        added = LookaheadWeights(ip_kv=ip_adapter_parts.ip_kv, sources={"ip_kv": ip_adapter_parts.ip_kv_source})
        counts = ip_adapter_parts.counts
    if kv_encoder is None:
        kv_encoder = checkpoint is None or not is_no_kv_checkpoint(checkpoint)
    settings = {"scheduler": read_json(sdxl / "scheduler" / "scheduler_config.json"), "resampler": resampler_config,
                "kv_encoder": kv_config, "pipeline": {} if kv_encoder else {"has_kv_encoder": False}}  # fmt: skip
    components = assemble(parts, clip, resampler, added, settings, Path(lcm_lora).expanduser() if lcm_lora else None)
    for module in (components.unet, components.text_encoder, components.text_encoder_2, clip, resampler):
        torch.nn.Module.to(module, dtype=dtype)  # the VAE keeps the dtype it was loaded in
    save(components, Path(faces).expanduser() if faces else None, out)
    return counts
