"""``Identity``: everything a generation needs from the reference face(s), computed once and storable.

Several reference images combine as follows: the conditional image tokens are the mean of each image's tokens (the
resampler's output keeps its 16 tokens, so every network shape stays the same), and every image's VAE latent is
kept, so the KV-encoder encodes each reference and the denoiser attends over all of their K/V, concatenated along
the token axis (own tokens first, then reference 1, 2, ...). One image is the authors' setting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import IdentityMismatchError, ModelFilesError

FORMAT = "lcmla-identity"
FORMAT_VERSION = 1
TENSORS = ("cond_tokens", "uncond_tokens", "latent_mean", "latent_std", "arcface")


@dataclass
class Identity:
    """Image tokens, face latents and (with a face pack) ArcFace embeddings of one person.

    ``cond_tokens``/``uncond_tokens``: ``(1, tokens, cross_attention_dim)``; ``latent_mean``/``latent_std``:
    ``(references, 4, face_size / 8, face_size / 8)``, unscaled; ``arcface``: ``(references, 512)``, L2-normalised,
    or ``None`` without a face pack. ``sources`` holds the SHA-256 of each reference's decoded RGB pixels;
    ``model_fingerprint`` the :attr:`Personalizer.fingerprint` of the model that made it; ``crop`` and
    ``face_resize`` how the photos were prepared (:meth:`Personalizer.encode_face`). Files written before
    ``face_resize`` existed load as ``"crop"``, the only preprocessing there was.
    """

    cond_tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    arcface: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)
    model_fingerprint: str = ""
    crop: str = "none"
    face_resize: str = "squash"
    boxes: list[list[float] | None] = field(default_factory=list)

    @property
    def num_references(self) -> int:
        return self.latent_mean.shape[0]

    @property
    def embedding(self) -> torch.Tensor | None:
        """One 512-d ArcFace embedding for the person: the normalised mean over the references."""
        if self.arcface is None:
            return None
        return torch.nn.functional.normalize(self.arcface.float().mean(0), dim=0)

    def check_model(self, fingerprint: str) -> None:
        if self.model_fingerprint != fingerprint:
            raise IdentityMismatchError(
                f"identity: made by model {self.model_fingerprint[:16] or '(unknown)'}, but this model is "
                f"{fingerprint[:16]}; encode the face again with this model"
            )

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file: the tensors, plus a JSON header under the ``lcmla`` metadata key."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name) for name in TENSORS if getattr(self, name) is not None}
        header = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model_fingerprint": self.model_fingerprint,
            "sources": self.sources, "crop": self.crop, "face_resize": self.face_resize, "boxes": self.boxes,
        }  # fmt: skip
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), {"lcmla": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> Identity:
        """Read a file written by :meth:`save`; with ``expected_fingerprint``, refuse one made by another model."""
        path = Path(path)
        if not path.is_file():
            raise ModelFilesError(f"identity: no such file: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {}).get("lcmla", "{}"))
            tensors = load_file(str(path))
        except (SafetensorError, OSError, json.JSONDecodeError) as error:
            raise ModelFilesError(f"identity: {path} is not a safetensors file: {error}") from None
        if header.get("format") != FORMAT:
            raise ModelFilesError(f"identity: {path} is not an lcmla identity file (no '{FORMAT}' header)")
        missing = [name for name in TENSORS[:4] if name not in tensors]
        if missing:
            raise ModelFilesError(f"identity: {path} lacks tensors {missing}")
        identity = cls(
            **{name: tensors.get(name) for name in TENSORS},
            sources=header["sources"], model_fingerprint=header["model_fingerprint"], crop=header["crop"],
            face_resize=header.get("face_resize", "crop"), boxes=header["boxes"],
        )  # fmt: skip
        if expected_fingerprint is not None:
            identity.check_model(expected_fingerprint)
        return identity
