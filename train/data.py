"""Training pairs from image sets in the authors' layout (``official_method_facts.md`` section 12).

* ``metadata.json`` maps image paths relative to the set's root to identity labels.
* Prompts come from file names: ``A_photo_of_conceptname_123456.jpg`` -> ``A photo of face`` (``conceptname`` ->
  the set's placeholder, trailing all-digit parts dropped).
* A pair is (reference, target): the target is any usable image, the reference a *different* image of the same
  identity (optionally only from paths containing ``vanilla``). Several sets mix by weight.
* What cannot be used is skipped and counted, never fatal mid-run: identities with a single image, missing files
  and identities without a reference are left out up front; unreadable files and references without a detected face
  are found when loaded, and the sample is redrawn.

Which pair a sample is depends only on (seed, step, rank, slot, attempt), so the data position of a run is its step.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lcmla_sdk.errors import InvalidImageError, LcmlaError
from lcmla_sdk.images import clip_pixels, load_rgb, to_uint8, vae_pixels

from .config import DataSetConfig

LandmarkSource = Callable[[np.ndarray], "np.ndarray | None"]

# Reasons a file or identity is left out, as the summary words them.
MISSING_FILE = "missing files"
SINGLE_IMAGE = "identities with a single image"
NO_REFERENCE = "identities without a reference image"
UNREADABLE = "unreadable images"
NO_FACE = "references without a detected face"


class DataError(LcmlaError, ValueError):
    """Training data that cannot be used at all (e.g. an unreadable metadata file or no usable pair)."""


def prompt_from_filename(path: str, placeholder: str) -> str:
    """``"Name/vanilla/A_photo_of_conceptname_123456.jpg"`` -> ``"A photo of face"`` for placeholder ``"face"``."""
    parts = PurePosixPath(path).stem.split("_")
    while parts and parts[-1].isdigit():
        parts.pop()
    return " ".join(parts).replace("conceptname", placeholder)


@dataclass(frozen=True)
class ImageEntry:
    path: Path
    identity: str  # "<set index>:<label>", so equal labels in different sets stay different people
    prompt: str


@dataclass
class _SetIndex:
    entries: list[ImageEntry]
    targets: list[int]  # entries that have at least one other reference image of their identity
    references: dict[str, list[int]]  # identity -> entries usable as references
    weight: float


@dataclass
class DataSummary:
    """What was left out and why: counted up front (identities, missing files) and while loading (files)."""

    sets: int = 0
    identities: int = 0
    targets: int = 0
    counts: Counter = field(default_factory=Counter)  # reason -> number of identities or files found up front
    skipped: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # reason -> paths, while loading

    def add_skipped(self, skipped: list[tuple[str, str]]) -> None:
        for reason, path in skipped:
            self.skipped[reason].add(path)

    def to_dict(self) -> dict[str, Any]:
        left_out = dict(self.counts)
        left_out.update({reason: len(paths) for reason, paths in self.skipped.items()})
        return {"sets": self.sets, "identities": self.identities, "usable_targets": self.targets, "left_out": left_out}

    def restore(self, saved: dict[str, Any]) -> None:
        """Take over the files skipped before a resume (their paths, for the final summary)."""
        for reason, paths in saved.get("skipped_paths", {}).items():
            self.skipped[reason].update(paths)

    def text(self) -> str:
        left_out = self.to_dict()["left_out"]
        reasons = [MISSING_FILE, SINGLE_IMAGE, NO_REFERENCE, UNREADABLE, NO_FACE]
        skipped = ", ".join(f"{left_out.get(reason, 0)} {reason}" for reason in reasons)
        return (
            f"data: {self.sets} set(s), {self.identities} identities, {self.targets} images usable as targets; "
            f"left out: {skipped}"
        )


class PairIndex:
    """The usable (target, reference) choices of every set, and their mixing weights."""

    def __init__(self, sets: list[DataSetConfig]) -> None:
        self.summary = DataSummary(sets=len(sets))
        self.sets = [self._index_set(index, config) for index, config in enumerate(sets)]
        usable = [s for s in self.sets if s.targets]
        if not usable:
            raise DataError(f"data.sets: no usable (reference, target) pair; {self.summary.text()}")
        weights = np.array([s.weight if s.targets else 0.0 for s in self.sets])
        self.weights = weights / weights.sum()

    def _index_set(self, set_index: int, config: DataSetConfig) -> _SetIndex:
        root = Path(config.root).expanduser()
        metadata_path = root / config.metadata
        try:
            metadata = json.loads(metadata_path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"data.sets.{set_index}.metadata: cannot read {metadata_path}: {error}") from None
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise DataError(f"data.sets.{set_index}.metadata: {metadata_path} must map image paths to identity labels")
        by_identity: dict[str, list[ImageEntry]] = defaultdict(list)
        for relative, label in sorted(metadata.items()):
            path = root / relative
            if not path.is_file():
                self.summary.counts[MISSING_FILE] += 1
                continue
            prompt = prompt_from_filename(relative, config.concept_placeholder) if config.prompt_in_filename else config.prompt
            by_identity[f"{set_index}:{label}"].append(ImageEntry(path, f"{set_index}:{label}", prompt))
        entries: list[ImageEntry] = []
        targets: list[int] = []
        references: dict[str, list[int]] = {}
        for identity, images in by_identity.items():
            if len(images) < 2:
                self.summary.counts[SINGLE_IMAGE] += 1
                continue
            first = len(entries)
            entries += images
            members = range(first, len(entries))
            refs = [i for i in members if not config.vanilla_only_references or "vanilla" in str(entries[i].path)]
            usable = [i for i in members if any(r != i for r in refs)]
            if not usable:
                self.summary.counts[NO_REFERENCE] += 1
                continue
            references[identity] = refs
            targets += usable
            self.summary.identities += 1
        self.summary.targets += len(targets)
        return _SetIndex(entries, targets, references, config.weight)

    def draw(self, seed: int, step: int, rank: int, slot: int, attempt: int) -> tuple[ImageEntry, ImageEntry]:
        """(reference, target) for one sample; a pure function of its arguments."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, step, rank, slot, attempt, 0x9A125]))
        data_set = self.sets[rng.choice(len(self.sets), p=self.weights)]
        target = data_set.targets[rng.integers(len(data_set.targets))]
        candidates = [r for r in data_set.references[data_set.entries[target].identity] if r != target]
        reference = candidates[rng.integers(len(candidates))]
        return data_set.entries[reference], data_set.entries[target]


class PairDataset(Dataset):
    """Loads the pair for key ``(step, slot)``: pixels for the VAE and CLIP, landmarks, prompts.

    A pair whose images cannot be read, or whose reference shows no face, is redrawn (attempt + 1) and reported in
    the sample's ``skipped`` list, so the main process can count it.
    """

    def __init__(
        self,
        index: PairIndex,
        resolution: int,
        clip_size: int,
        landmarks: LandmarkSource,
        seed: int,
        rank: int,
        max_redraws: int,
    ) -> None:
        self.index, self.resolution, self.clip_size = index, resolution, clip_size
        self.landmarks, self.seed, self.rank, self.max_redraws = landmarks, seed, rank, max_redraws

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        step, slot = key
        skipped: list[tuple[str, str]] = []
        for attempt in range(self.max_redraws):
            reference, target = self.index.draw(self.seed, step, self.rank, slot, attempt)
            images = {}
            for role, entry in (("reference", reference), ("target", target)):
                try:
                    images[role] = vae_pixels(load_rgb(entry.path), self.resolution)[0]
                except InvalidImageError:
                    skipped.append((UNREADABLE, str(entry.path)))
                    break
            if len(images) < 2:
                continue
            reference_uint8 = to_uint8(images["reference"])
            landmarks = self.landmarks(reference_uint8)
            if landmarks is None:
                skipped.append((NO_FACE, str(reference.path)))
                continue
            return {
                "step": step,
                "reference_pixels": images["reference"],
                "reference_clip": clip_pixels(load_rgb(reference_uint8), self.clip_size)[0],
                "reference_landmarks": torch.as_tensor(landmarks, dtype=torch.float32),
                "reference_prompt": reference.prompt,
                "target_pixels": images["target"],
                "target_prompt": target.prompt,
                "identity": target.identity,
                "skipped": skipped,
            }
        raise DataError(
            f"data: {self.max_redraws} draws in a row for step {step} slot {slot} were unusable "
            f"(last: {skipped[-1][0]}: {skipped[-1][1]}); check the data sets"
        )


class StepBatches(Sampler):
    """Batches of ``(step, slot)`` keys for steps ``start`` .. ``end - 1``: the data position is the step."""

    def __init__(self, start: int, end: int, batch_size: int) -> None:
        self.start, self.end, self.batch_size = start, end, batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            yield [(step, slot) for slot in range(self.batch_size)]

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"skipped": [item for sample in samples for item in sample["skipped"]]}
    for key, value in samples[0].items():
        if key == "skipped":
            continue
        values = [sample[key] for sample in samples]
        batch[key] = torch.stack(values) if isinstance(value, torch.Tensor) else values
    return batch
