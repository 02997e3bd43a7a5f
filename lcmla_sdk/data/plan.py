"""What a data set holds before anything is generated: every image's prompt, seed and path, in the authors' layout.

Layout and names (the authors' ``scripts/faces_generation.py``): ``<folder>/vanilla/A_photo_of_conceptname_<seed>.jpg``
and ``<folder>/stylized/<style prompt with conceptname>_<seed>.jpg``; ``lcmla train`` reads the prompt back from the
name (``A photo of face``). An image's seed is a pure function of (run seed, identity index, prompt, slot), so the plan
of an identity never depends on the others, on shards, or on how many images were asked for before.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from .descriptions import Identity

PLACEHOLDER = "conceptname"
VANILLA = "A photo of {concept}"
# The authors' five stylised prompts (scripts/prompts_bank.py), by the name --styles takes.
STYLES = {
    "graffiti": "A colorful graffiti of {concept}",
    "pencil": "A pencil drawing of {concept}",
    "watercolor": "A watercolor painting of {concept}",
    "comic": "A drawing of {concept} in a comic book",
    "oil": "An oil painting of {concept}",
}
CONSISTENCY = ("attention", "filter")
SEED_RANGE = 2**31  # seeds in file names stay below this, as positive 31-bit integers


@dataclass(frozen=True)
class PlanOptions:
    """Everything that decides which images a set holds and how they look (recorded in the set's run record: a
    resumed run must match it).

    ``per_identity``: photos (``vanilla/``) per identity; ``per_style``: images per style (``stylized/``);
    ``consistent``: a subset of :data:`CONSISTENCY`; ``anchors``: the identity's first photos that every other image
    of it attends to in ``attention`` mode; ``threshold``: the filter's least mean cosine to the identity's other
    photos; ``faces``: the face backend measuring (and filtering) identities, or ``None``.
    """

    per_identity: int = 5
    per_style: int = 1
    styles: tuple[str, ...] = tuple(STYLES)
    size: int = 512
    seed: int = 0
    consistent: tuple[str, ...] = ()
    anchors: int = 2
    threshold: float = 0.92
    faces: str | None = None

    def __post_init__(self) -> None:
        for name in ("per_identity", "per_style", "size", "seed", "anchors"):
            value, least = getattr(self, name), 1 if name in ("size", "anchors") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
        if self.size % 8:
            raise ValueError(f"size: {self.size} is not a multiple of 8 (the VAE's scale)")
        unknown = [s for s in self.styles if s not in STYLES]
        if unknown or len(set(self.styles)) != len(self.styles):
            raise ValueError(f"styles: {list(self.styles)} must be distinct names among {list(STYLES)}")
        bad = [c for c in self.consistent if c not in CONSISTENCY]
        if bad:
            raise ValueError(f"consistent: {bad} are not among {list(CONSISTENCY)} (or 'none')")
        if self.per_identity + self.per_style * len(self.styles) == 0:
            raise ValueError("per_identity: every identity needs at least one image")
        if self.consistent and self.per_identity < 2:
            raise ValueError("per_identity: consistent modes need at least 2 photos per identity")
        if "filter" in self.consistent and self.faces is None:
            raise ValueError("faces: the filter needs a face backend (e.g. 'dlib')")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold: expected a cosine in (0, 1], got {self.threshold!r}")

    @property
    def anchor_count(self) -> int:
        """Anchors per identity in attention mode (0 otherwise)."""
        return min(self.anchors, self.per_identity) if "attention" in self.consistent else 0

    def record(self) -> dict:
        return {**asdict(self), "styles": list(self.styles), "consistent": list(self.consistent)}


@dataclass(frozen=True)
class ImageJob:
    """One image: its ``relative`` path in the set, the ``prompt`` it is made from, its ``seed``; ``anchor``: one
    of the identity's first photos, which the identity's other images attend to in attention mode."""

    identity: Identity
    relative: str
    prompt: str
    seed: int
    anchor: bool = False

    @property
    def vanilla(self) -> bool:
        return "/vanilla/" in self.relative


def file_name(template: str, seed: int) -> str:
    """``"A photo of {concept}"``, 123 -> ``"A_photo_of_conceptname_123.jpg"`` (the authors' convention)."""
    return f"{template.format(concept=PLACEHOLDER).replace(' ', '_')}_{seed}.jpg"


def image_jobs(identity: Identity, options: PlanOptions) -> list[ImageJob]:
    """The identity's images: its photos first (the first ``anchor_count`` are anchors), then each style's."""
    prompts = [(0, VANILLA, "vanilla", options.per_identity)]
    prompts += [(1 + list(STYLES).index(s), STYLES[s], "stylized", options.per_style) for s in options.styles]
    jobs, used = [], set()
    for kind, template, folder, count in prompts:
        for slot in range(count):
            seed = _seed(options.seed, identity.index, kind, slot)
            while (template, seed) in used:  # two equal seeds of one prompt would share a file name
                seed = (seed + 1) % SEED_RANGE
            used.add((template, seed))
            relative = f"{identity.folder}/{folder}/{file_name(template, seed)}"
            prompt = template.format(concept=identity.description)
            jobs.append(ImageJob(identity, relative, prompt, seed, kind == 0 and slot < options.anchor_count))
    return jobs


def _seed(seed: int, identity: int, kind: int, slot: int) -> int:
    return int(np.random.SeedSequence([seed, identity, kind, slot, 0x5EED]).generate_state(1)[0]) % SEED_RANGE


@dataclass(frozen=True)
class Shard:
    """Identities ``index``, ``index + count``, ... of the list (round robin keeps shards equally long)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not found or not 0 <= int(found.group(1)) < int(found.group(2)):
            raise ValueError(f"shard: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
        return cls(int(found.group(1)), int(found.group(2)))

    def select(self, identities: list[Identity]) -> list[Identity]:
        return identities[self.index :: self.count]

    @property
    def name(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"
