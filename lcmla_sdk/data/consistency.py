"""Making and measuring one person across an identity's images.

* ``attention``: :class:`AnchorAttnProcessor` on the Turbo UNet: in every self-attention layer an image attends to
  its own tokens and to those of its identity's anchor photos (generated in the same batch), as the consistent
  self-attention the paper compares against shares keys and values across a batch. Anchors attend to each other
  only, so an image depends on its own seed and its anchors' seeds: the same in any batch, after any resume.
* ``filter``: :func:`check_identity` drops, one at a time, the photo whose face-recognition embedding agrees least
  with the identity's other photos until every remaining one's mean cosine to the others is >= threshold, and drops
  the identity when fewer than two photos remain. Stylised images are not checked (recognisers are trained on
  photos) but go with their identity.

:func:`similarity_report` gives the within- and between-identity cosine that the modes are compared by.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..faces import FaceAnalyzer

NO_FACE = "no face detected"
DISAGREES = "face differs from the identity's other photos"
TOO_FEW = "identity has fewer than 2 agreeing photos"


class AnchorAttnProcessor:
    """Attention for every layer of the UNet; self-attention also attends over the anchors' tokens.

    Call arguments (through ``cross_attention_kwargs``): ``anchor_rows`` (B, A) the batch rows of each row's anchors,
    ``anchor_self`` (B, A) where that anchor is the row itself (masked out: a row's own tokens count once).
    Without them it is plain scaled-dot-product attention.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        anchor_rows: torch.Tensor | None = None,
        anchor_self: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("AnchorAttnProcessor: attention masks are not supported (SDXL's UNet passes none)")
        batch, tokens, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key, value = (x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
                             for x in (query, key, value))  # fmt: skip
        mask = None
        if encoder_hidden_states is None and anchor_rows is not None:
            anchors = anchor_rows.shape[1]
            key = torch.cat([key, *(key[anchor_rows[:, a]] for a in range(anchors))], dim=2)
            value = torch.cat([value, *(value[anchor_rows[:, a]] for a in range(anchors))], dim=2)
            if bool(anchor_self.any()):
                keep = torch.cat([torch.ones_like(anchor_self[:, :1]), ~anchor_self], dim=1)
                mask = keep.repeat_interleave(tokens, dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def anchor_arguments(groups: list[tuple[int, list[int]]], device: torch.device) -> dict[str, torch.Tensor]:
    """``cross_attention_kwargs`` for a batch laid out as ``groups``: (number of rows, their anchors' batch rows)."""
    rows = [anchors for size, anchors in groups for _ in range(size)]
    anchor_rows = torch.tensor(rows, dtype=torch.long)
    anchor_self = anchor_rows == torch.arange(len(rows))[:, None]
    return {"anchor_rows": anchor_rows.to(device), "anchor_self": anchor_self.to(device)}


@dataclass
class IdentityCheck:
    """The verdict on one identity's photos: ``dropped`` (path -> reason), the ``within`` mean pairwise cosine of
    its detected faces (before filtering) and one ``embedding`` that stands for it (its first kept face)."""

    dropped: dict[str, str] = field(default_factory=dict)
    faces: int = 0
    within: float | None = None
    embedding: list[float] | None = None


def check_identity(
    analyzer: FaceAnalyzer, photos: dict[str, Image.Image], others: list[str], threshold: float, filtering: bool
) -> IdentityCheck:
    """Embed ``photos`` (path -> image); with ``filtering``, drop faceless and disagreeing ones, and every path (the
    photos and ``others``, its stylised images) when fewer than two photos remain."""
    embeddings = {}
    for path, image in photos.items():
        faces = analyzer.detect(image)
        if faces:
            embeddings[path] = faces[0].embedding
    check = IdentityCheck(faces=len(embeddings))
    paths, vectors = list(embeddings), np.array(list(embeddings.values()), dtype=np.float64)
    cosines = vectors @ vectors.T if paths else np.zeros((0, 0))
    if len(paths) >= 2:
        check.within = float(cosines[np.triu_indices(len(paths), k=1)].mean())
    if filtering:
        check.dropped.update({path: NO_FACE for path in photos if path not in embeddings})
        members = list(range(len(paths)))
        while len(members) >= 2:  # the photo agreeing least goes first, so one outlier cannot sink the others
            agreement = (cosines[np.ix_(members, members)].sum(axis=1) - 1.0) / (len(members) - 1)
            worst = int(np.argmin(agreement))
            if agreement[worst] >= threshold:
                break
            check.dropped[paths[members.pop(worst)]] = DISAGREES
        if len(members) < 2:
            check.dropped.update({path: TOO_FEW for path in [*photos, *others] if path not in check.dropped})
    kept = [path for path in paths if path not in check.dropped]
    if kept:
        check.embedding = [round(float(v), 6) for v in embeddings[kept[0]]]
    return check


def similarity_report(withins: list[float], embeddings: list[list[float]]) -> dict[str, float | int | None]:
    """Mean within-identity cosine (over identities) and mean between-identity cosine (one face per identity, all
    pairs)."""
    between = None
    if len(embeddings) >= 2:
        vectors = np.array(embeddings, dtype=np.float64)
        cosines = vectors @ vectors.T
        between = float(cosines[np.triu_indices(len(vectors), k=1)].mean())
    return {
        "within_identity_cosine": float(np.mean(withins)) if withins else None,
        "between_identity_cosine": between,
        "identities_measured": len(withins),
        "identities_compared": len(embeddings),
    }
