"""Weight files in and out: safe reading, shape checks, IP-Adapter files and LCM-LoRA files.

Only safetensors and ``torch.load(weights_only=True)`` are used: a pickle that holds anything but tensors and
plain containers is refused. LCM-Lookahead's own weights on the UNet are loaded and read by :mod:`lcmla_sdk.wiring`.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ModelFilesError
from .lora import LCM_ADAPTER, adapter_state, has_adapter

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
LORA_FILE = "pytorch_lora_weights.safetensors"


def read_state_dict(path: str | Path) -> dict:
    """A (possibly nested) state dict from ``.safetensors`` or a weights-only torch pickle."""
    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(f"{path}: no such file")
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise ModelFilesError(f"{path}: unknown weight format; expected .safetensors or one of {PICKLE_SUFFIXES}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        raise ModelFilesError(f"{path}: cannot read weights safely: {load_error_reason(error)}") from None
    if not isinstance(state, dict):
        raise ModelFilesError(f"{path}: not a state dict (the file holds a {type(state).__name__})")
    return state


def load_error_reason(error: Exception) -> str:
    """The part of a loader error that says what is wrong (torch's weights-only refusal opens with generic advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    if not text.startswith("Weights only load failed"):
        return text.splitlines()[0] if text else type(error).__name__
    # Three shapes: "... WeightsUnpickler error: <reason>", the reason as the paragraph after the advice, or (torch 2.6)
    # a line naming the blocked GLOBAL right under it.
    _, found, detail = text.partition("WeightsUnpickler error:")
    if not found:
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        blocked = [line.strip() for line in text.splitlines()[1:] if "GLOBAL" in line]
        candidates = [p for p in blocked + paragraphs[1:] if not p.startswith("Check the documentation")]
        detail = candidates[0] if candidates else "unknown reason"
    detail = re.split(r"\.\s|\n", detail.strip())[0]  # its first sentence
    if "global" in detail.lower():
        return f"it holds objects other than tensors, which are never unpickled ({detail})"
    return f"not a plain pickle of tensors ({detail})"


def first_keys(keys, count: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - count} more)" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more


def shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def check_shapes(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    """Same keys, same shapes, or a :class:`ModelFilesError` that lists the first offending keys."""
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"missing {first_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {first_keys(unexpected)}")
    if wrong:
        problems.append(
            f"shape mismatch {first_keys(wrong)} ({wrong[0]}: {tuple(found[wrong[0]])} in the file, "
            f"{tuple(expected[wrong[0]])} expected)"
        )
    raise ModelFilesError(f"{source}: {'; '.join(problems)}")


def blocks_in_module_order(unet: UNet2DConditionModel) -> list[str]:
    """Transformer blocks in registration order (down, up, mid): the order of IP-Adapter files' attention indices."""
    return [name for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)]


# ------------------------------------------------------------------ IP-Adapter files (h94 format)
def read_ip_adapter(path: str | Path) -> dict[str, dict]:
    """An original ``ip-adapter-plus-face_sdxl_vit-h`` file (``.bin`` nested, or ``.safetensors`` flat with
    ``image_proj.``/``ip_adapter.`` prefixes) as ``{"image_proj": ..., "ip_adapter": ...}``."""
    state = read_state_dict(path)
    if "image_proj" not in state:
        state = {
            part: {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(part + ".")}
            for part in ("image_proj", "ip_adapter")
        }
    if not state.get("image_proj") or not state.get("ip_adapter"):
        raise ModelFilesError(f"{path}: not an IP-Adapter file (needs 'image_proj' and 'ip_adapter' weights)")
    return state


@dataclass
class IPAdapterParts:
    """An original IP-Adapter Plus file, loaded: its resampler (with its constructor arguments) and its IP K/V under
    lcmla's names (for :func:`lcmla_sdk.wiring.wire_unet`)."""

    resampler: IPAdapterPlusImageProjection
    resampler_config: dict[str, Any]
    ip_kv: dict[str, torch.Tensor]
    ip_kv_source: str  # where the IP K/V came from, for error messages
    counts: dict[str, int]  # keys of the file, by part


def load_ip_adapter(path: str | Path, unet: UNet2DConditionModel, resampler_config: dict | None = None) -> IPAdapterParts:
    """Read an original IP-Adapter Plus file (:func:`read_ip_adapter`) for ``unet``: the resampler is built from
    ``resampler_config`` or, by default, from the file's shapes (:func:`resampler_config_from_ip_adapter`).

    ``image_proj`` keys are renamed by diffusers' own converter; ``ip_adapter`` key ``{2i+1}.to_k_ip.weight``
    belongs to the i-th transformer block in module order (attention processors are numbered attn1, attn2, ...).
    """
    state = read_ip_adapter(path)
    config = resampler_config or resampler_config_from_ip_adapter(state["image_proj"], Path(path))
    resampler = IPAdapterPlusImageProjection(**config)
    load_image_proj(state["image_proj"], unet, resampler, f"{path} (image_proj)")
    left = dict(state["ip_adapter"])
    ip_kv = {}
    for index, block in enumerate(blocks_in_module_order(unet)):
        for name in ("to_k_ip", "to_v_ip"):
            key = f"{2 * index + 1}.{name}.weight"
            if key in left:
                ip_kv[f"{block}.{name}.weight"] = left.pop(key)
    if left:
        raise ModelFilesError(f"{path}: 'ip_adapter' keys with no attention layer: {first_keys(left)}")
    counts = {"IP-Adapter image_proj": len(state["image_proj"]), "IP-Adapter ip_adapter": len(state["ip_adapter"])}
    return IPAdapterParts(resampler, config, ip_kv, f"{path} (ip_adapter)", counts)


def load_image_proj(
    image_proj: dict, unet: UNet2DConditionModel, resampler: IPAdapterPlusImageProjection, source: str
) -> None:
    """IP-Adapter Plus resampler weights in the original naming, renamed by diffusers' own converter."""
    try:
        converted = unet._convert_ip_adapter_image_proj_to_diffusers(dict(image_proj), low_cpu_mem_usage=False)
    except (KeyError, RuntimeError) as error:
        raise ModelFilesError(f"{source}: not an IP-Adapter Plus resampler: {error}") from None
    load_module_state(resampler, converted.state_dict(), source)


def load_module_state(module: nn.Module, state: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` whose failure is a :class:`ModelFilesError` naming ``source``."""
    check_shapes(shapes(module.state_dict()), shapes(state), source)
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------ LoRA adapters
def load_lcm_lora(unet: UNet2DConditionModel, path: str | Path) -> None:
    """Attach an SDXL LCM-LoRA as the ``lcm`` adapter, from any format diffusers' SDXL LoRA loader accepts
    (diffusers/peft names with or without the ``unet.`` prefix, kohya ``lora_unet_*`` names with alphas)."""
    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    state = read_state_dict(file)
    metadata = None
    if file.suffix == ".safetensors":
        from diffusers.loaders.lora_base import _load_sft_state_dict_metadata

        metadata = _load_sft_state_dict_metadata(str(file))
    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(state, unet_config=unet.config)
    text_keys = [k for k in state if k.startswith("text_encoder")]
    if text_keys:
        raise ModelFilesError(f"{file}: text-encoder LoRA keys ({first_keys(text_keys)}); an LCM-LoRA adapts the UNet only")
    prefix = "unet" if any(k.startswith("unet.") for k in state) else None
    try:
        with warnings.catch_warnings():
            # The kv_encoder adapter is usually there already: two adapters on one UNet is the design (lora.py).
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.load_lora_adapter(state, prefix=prefix, network_alphas=alphas, metadata=metadata, adapter_name=LCM_ADAPTER)
    except (ValueError, RuntimeError, KeyError) as error:
        raise ModelFilesError(f"{file}: not an SDXL UNet LoRA for this model: {error}") from None
    if not has_adapter(unet, LCM_ADAPTER):
        raise ModelFilesError(f"{file}: no LoRA weight matched a layer of the UNet")


def save_lcm_lora(unet: UNet2DConditionModel, folder: Path) -> Path:
    """diffusers' LoRA file (peft names, the LoraConfig as ``lora_adapter_metadata``), byte-for-byte reproducible.

    diffusers' own writer lists peft's ``target_modules`` set and two metadata entries in a per-process order, so
    the same weights would give another file, and another model fingerprint, in every process.
    """
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in unet.peft_config[LCM_ADAPTER].to_dict().items()}
    state = adapter_state(unet, LCM_ADAPTER)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_FILE
    metadata = {LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def resampler_config_from_ip_adapter(image_proj: dict | None, source: Path) -> dict[str, Any]:
    """Constructor arguments of the IP-Adapter Plus resampler in an original file, by diffusers' rule (64-wide heads)."""
    try:
        hidden = image_proj["latents"].shape[2]
        return {
            "embed_dims": image_proj["proj_in.weight"].shape[1], "output_dims": image_proj["proj_out.weight"].shape[0],
            "hidden_dims": hidden, "depth": len({k.split(".")[1] for k in image_proj if k.startswith("layers.")}),
            "dim_head": 64, "heads": image_proj["layers.0.0.to_q.weight"].shape[0] // 64,
            "num_queries": image_proj["latents"].shape[1],
            "ffn_ratio": image_proj["layers.0.1.1.weight"].shape[0] // hidden,
        }  # fmt: skip
    except (KeyError, TypeError, IndexError):
        raise ModelFilesError(f"{source}: 'image_proj' is not an IP-Adapter Plus resampler") from None
