"""Inputs of ``lcmla convert`` named on the Hugging Face Hub: ``hf://OWNER/NAME[@REVISION][/PATH]`` (the
``huggingface_hub`` file-system syntax). They are fetched with ``huggingface_hub`` into its cache (``HF_HUB_CACHE``;
downloads resume, show progress bars, and are reused by later runs; ``HF_HUB_OFFLINE=1`` uses the cache only) and
the local path is returned. A folder fetches only what loading reads: configs, tokenizer files and the safetensors
weights (never the repository's single-file checkpoints, ``.bin`` pickles, ONNX or Flax copies)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFilesError

PREFIX = "hf://"
# The SDXL base's folders that lcmla reads (model_index.json names them).
SDXL_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
WEIGHT_STEMS = ("model", "diffusion_pytorch_model")


@dataclass(frozen=True)
class HubPath:
    """``hf://repo_id[@revision][/path]`` taken apart."""

    repo_id: str
    revision: str | None
    path: str

    @classmethod
    def parse(cls, value: str, option: str) -> HubPath:
        owner, _, rest = value.removeprefix(PREFIX).partition("/")
        name, _, path = rest.partition("/")
        name, _, revision = name.partition("@")
        if not owner or not name:
            raise ValueError(f"{option}: {value!r} is not hf://OWNER/NAME[@REVISION][/PATH]")
        return cls(f"{owner}/{name}", revision or None, path.strip("/"))


def is_hub(value: str | Path) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def folder_patterns(folders: list[str], variant: str | None) -> list[str]:
    """``allow_patterns`` for diffusers/transformers folders: configs, tokenizer files, weights of ``variant``."""
    weights = f".{variant}.safetensors" if variant else ".safetensors"
    per_folder = ["*.json", "*.txt", *(f"{stem}{weights}" for stem in WEIGHT_STEMS),
                  *(f"{stem}{weights.removesuffix('.safetensors')}-*-of-*.safetensors" for stem in WEIGHT_STEMS)]  # fmt: skip
    return [f"{folder}/{pattern}" if folder else pattern for folder in folders for pattern in per_folder]


def fetch(value: str | Path, option: str, sdxl: bool = False, variant: str | None = None) -> Path:
    """The local path of ``value``: itself, or for ``hf://`` the cached download. A ``PATH`` with a suffix is a
    file; otherwise a folder (``sdxl``: the SDXL base's component folders, with ``variant`` weights)."""
    if not is_hub(value):
        return Path(value).expanduser()
    where = HubPath.parse(str(value), option)
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError as error:
        raise ModelFilesError(f"{option}: hf:// needs huggingface_hub: pip install 'lcmla[hub]' ({error})") from None
    try:
        if Path(where.path).suffix:
            return Path(hf_hub_download(where.repo_id, where.path, revision=where.revision))
        if sdxl:
            folders = [f"{where.path}/{f}" if where.path else f for f in SDXL_FOLDERS]
            patterns = ["model_index.json", *folder_patterns(folders, variant)]
        else:
            patterns = folder_patterns([where.path], None)
        root = Path(snapshot_download(where.repo_id, revision=where.revision, allow_patterns=patterns))
    except (HfHubHTTPError, OSError, ValueError) as error:  # offline misses are OSErrors
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFilesError(f"{option}: cannot fetch {value}: {first_line}") from None
    return root / where.path if where.path else root
