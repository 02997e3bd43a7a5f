"""``Identity``: everything a generation needs from the reference face(s), computed once and storable.

Several reference images combine as follows: the conditional image tokens are the mean of each image's tokens (the
resampler's output keeps its 16 tokens, so every network shape stays the same), and every image's VAE latent is
kept, so the KV-encoder encodes each reference and the denoiser attends over all of their K/V, concatenated along
the token axis (own tokens first, then reference 1, 2, ...). One image is the authors' setting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from . import validation
from .atomic import atomic_path
from .errors import IdentityMismatchError, ModelFilesError
from .images import CROPS, FACE_RESIZES, FaceInput
from .schema import NAME, STRING, Is, ListOf, Object, OneOf, check, nullable

FORMAT = "lcmla-identity"
FORMAT_VERSION = 2  # 2: face embeddings of any backend (version 1 stored insightface's as "arcface")
TENSORS = ("cond_tokens", "uncond_tokens", "latent_mean", "latent_std", "face_embeddings")
NUMBER = Is((int, float), "a number")
# The JSON header under the file's ``lcmla`` metadata key (version 1 files have no detection fields but boxes).
HEADER = Object(
    {
        "format": OneOf((FORMAT,)), "format_version": OneOf((1, FORMAT_VERSION)), "model_fingerprint": STRING,
        "sources": ListOf(NAME), "crop": OneOf(CROPS),
        "boxes": ListOf(nullable(ListOf(NUMBER), "a box [x0, y0, x1, y1]")),
    },
    optional={
        "face_resize": OneOf(FACE_RESIZES), "face_backend": STRING,
        "landmarks": ListOf(nullable(ListOf(ListOf(NUMBER)), "five [x, y] points")),
    },
)  # fmt: skip


@dataclass
class Identity:
    """Image tokens, face latents and (with face detection) the detections of one person.

    ``cond_tokens``/``uncond_tokens``: ``(1, tokens, cross_attention_dim)``; ``latent_mean``/``latent_std``:
    ``(references, 4, face_size / 8, face_size / 8)``, unscaled. ``sources`` holds the SHA-256 of each reference's
    decoded RGB pixels; ``model_fingerprint`` the :attr:`Personalizer.fingerprint` of the model that made it;
    ``crop`` and ``face_resize`` how the photos were prepared (:meth:`Personalizer.encode_face`; files written
    before ``face_resize`` existed load as ``"crop"``, the only preprocessing there was).
    Detections, one per reference (``None``/empty with detection off): ``face_embeddings`` ``(references, D)``,
    L2-normalised (D = 512 for insightface's ArcFace, 128 for dlib), ``boxes`` (x1, y1, x2, y2), ``landmarks``
    (5 points, :data:`~lcmla_sdk.faces.ARCFACE_TEMPLATE`'s order), and ``face_backend``, the analyzer's name.
    """

    cond_tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    face_embeddings: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)
    model_fingerprint: str = ""
    crop: str = "none"
    face_resize: str = "squash"
    boxes: list[list[float] | None] = field(default_factory=list)
    landmarks: list[list[list[float]] | None] = field(default_factory=list)
    face_backend: str = ""
    # (the fingerprint and tensors it was computed from, the digest): hashing copies the tensors to the host, which
    # waits for the GPU, so a generation call hashes an identity once.
    _digest: tuple[tuple, str] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def blank(cls, references: int, tokens: int, width: int, channels: int, latent_side: int,
              model_fingerprint: str) -> Identity:  # fmt: skip
        """Zero image tokens ``(1, tokens, width)`` and ``references`` unit latent distributions ``(channels,
        latent_side, latent_side)``: an identity of a model's shapes that stands for none (:meth:`Personalizer.warmup`)."""
        latent = (references, channels, latent_side, latent_side)
        return cls(
            cond_tokens=torch.zeros(1, tokens, width), uncond_tokens=torch.zeros(1, tokens, width),
            latent_mean=torch.zeros(latent), latent_std=torch.ones(latent), model_fingerprint=model_fingerprint,
        )  # fmt: skip

    @property
    def num_references(self) -> int:
        return self.latent_mean.shape[0]

    def __repr__(self) -> str:  # a summary: the dataclass's would print every tensor's values
        shapes = ", ".join(f"{name}={tuple(getattr(self, name).shape)}" for name in ("cond_tokens", "latent_mean"))
        return (f"Identity(references={self.num_references}, {shapes}, device={self.latent_mean.device}, "
                f"crop={self.crop!r}, face_resize={self.face_resize!r}, face_backend={self.face_backend!r}, "
                f"model_fingerprint={self.model_fingerprint[:12]!r})")  # fmt: skip

    @property
    def embedding(self) -> torch.Tensor | None:
        """One face-recognition embedding for the person: the normalised mean over the references."""
        if self.face_embeddings is None:
            return None
        return torch.nn.functional.normalize(self.face_embeddings.float().mean(0), dim=0)

    def digest(self) -> str:
        """SHA-256 of the tensors a generation reads and of the model that made them (a cache key). Computed once
        per set of tensor objects: replace a tensor rather than change it in place."""
        source = (self.model_fingerprint, *(getattr(self, name) for name in TENSORS[:4]))
        if self._digest is None or any(a is not b for a, b in zip(self._digest[0], source)):
            self._digest = (source, self._hash())
        return self._digest[1]

    def _hash(self) -> str:
        digest = hashlib.sha256(self.model_fingerprint.encode())
        for name in TENSORS[:4]:
            tensor = getattr(self, name).detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def tensor_problem(self) -> str | None:
        """What is wrong with the tensors on their own (dtype, shape, non-finite values), or ``None``."""
        for name in TENSORS:
            tensor = getattr(self, name)
            if tensor is None and name == "face_embeddings":
                continue
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                return f"{name} must be a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}"
            if not torch.isfinite(tensor).all():
                return f"{name} holds NaN or infinite values"
        shapes = {name: tuple(getattr(self, name).shape) for name in TENSORS if getattr(self, name) is not None}
        if len(shapes["cond_tokens"]) != 3 or shapes["cond_tokens"][0] != 1 or shapes["uncond_tokens"] != shapes["cond_tokens"]:
            return f"cond_tokens {shapes['cond_tokens']} and uncond_tokens {shapes['uncond_tokens']} must both be (1, tokens, width)"
        if len(shapes["latent_mean"]) != 4 or shapes["latent_std"] != shapes["latent_mean"]:
            return f"latent_mean {shapes['latent_mean']} and latent_std {shapes['latent_std']} must both be (references, channels, h, w)"
        if (self.latent_std < 0).any():
            return "latent_std holds negative values"
        embeddings = shapes.get("face_embeddings")
        if embeddings is not None and (len(embeddings) != 2 or embeddings[0] != self.num_references):
            return f"face_embeddings {embeddings} must be ({self.num_references}, D), one embedding per reference"
        return None

    def check_model(self, fingerprint: str) -> None:
        if self.model_fingerprint != fingerprint:
            raise IdentityMismatchError(
                f"identity: made by model {self.model_fingerprint[:16] or '(unknown)'}, but this model is "
                f"{fingerprint[:16]}; encode the face again with this model"
            )

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file: the tensors, plus a JSON header under the ``lcmla`` metadata key."""
        path = validation.path(path, "path")
        tensors = {name: getattr(self, name) for name in TENSORS if getattr(self, name) is not None}
        header = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model_fingerprint": self.model_fingerprint,
            "sources": self.sources, "crop": self.crop, "face_resize": self.face_resize, "boxes": self.boxes,
            "landmarks": self.landmarks, "face_backend": self.face_backend,
        }  # fmt: skip
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(path, failures=(SafetensorError,)) as temporary:  # an existing file survives a failed save
            save_file(tensors, str(temporary), {"lcmla": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> Identity:
        """Read a file written by :meth:`save`; with ``expected_fingerprint``, refuse one made by another model.

        The header is checked against :data:`HEADER` and the tensors by :meth:`tensor_problem` (a file with NaNs
        would give black images) before the identity is returned; errors name the file and the field."""
        path = validation.path(path, "path")
        if expected_fingerprint is not None and not isinstance(expected_fingerprint, str):
            raise ValueError(f"expected_fingerprint: expected a string or None, got {type(expected_fingerprint).__name__}")
        if not path.is_file():
            raise ModelFilesError(f"identity: no such file: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get("lcmla")
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ModelFilesError(f"identity: {path} is not a safetensors file: {error}") from None
        try:
            header = json.loads(text) if text is not None else None
        except json.JSONDecodeError as error:
            raise ModelFilesError(f"identity: {path}: its '{FORMAT}' header is not valid JSON: {error}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ModelFilesError(f"identity: {path} is not an lcmla identity file (no '{FORMAT}' header)")
        check(header, HEADER, f"identity: {path}: header")
        missing = [name for name in TENSORS[:4] if name not in tensors]
        if missing:
            raise ModelFilesError(f"identity: {path} lacks tensors {missing}")
        if "arcface" in tensors:  # version 1: insightface was the only backend
            tensors["face_embeddings"] = tensors.pop("arcface")
            header.setdefault("face_backend", "insightface")
        identity = cls(
            **{name: tensors.get(name) for name in TENSORS},
            sources=header["sources"], model_fingerprint=header["model_fingerprint"], crop=header["crop"],
            face_resize=header.get("face_resize", "crop"), boxes=header["boxes"], landmarks=header.get("landmarks", []),
            face_backend=header.get("face_backend", ""),
        )  # fmt: skip
        problem = identity.tensor_problem()
        if problem is not None:
            raise ModelFilesError(f"identity: {path}: {problem}")
        if expected_fingerprint is not None:
            identity.check_model(expected_fingerprint)
        return identity


def identities_per_prompt(face: FaceInput | Sequence[FaceInput] | Identity | Sequence, prompts: int,
                          check: Callable[[Identity], None], encode: Callable[[list], Identity]) -> list[Identity]:  # fmt: skip
    """The :class:`Identity` of each of ``prompts`` prompts: ``face`` for all of them, or ``face[i]`` for prompt ``i``
    when ``face`` is a list of Identities or of photo lists (a list of photos is one person's). A given identity goes
    through ``check``, photos through ``encode``; every prompt's identity must have as many reference photos."""
    per_prompt = isinstance(face, (list, tuple)) and bool(face) and all(isinstance(f, (Identity, list, tuple)) for f in face)
    faces = list(face) if per_prompt else [face]
    if per_prompt and len(faces) != prompts:
        raise ValueError(f"face: {len(faces)} faces for {prompts} prompts; give one face, or one per prompt")
    identities = []
    for item in faces:
        if isinstance(item, Identity):
            check(item)
        identities.append(item if isinstance(item, Identity) else encode(item))
    references = sorted({identity.num_references for identity in identities})
    if len(references) > 1:
        raise ValueError(f"face: the prompts' identities have {references} reference photos; one call takes "
                         "identities with as many (group the prompts by it)")  # fmt: skip
    return identities if per_prompt else identities * prompts
