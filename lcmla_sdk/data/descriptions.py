"""Identities as words: a seeded generator of natural descriptions of people, or a user's own list.

A description reads like ``a slim 34-year-old Korean woman with shoulder-length wavy auburn hair and round glasses,
smiling``; it fills the authors' prompt ``A photo of {concept}`` and is the identity's label in ``metadata.json``.
Its attributes are drawn independently except where that would read wrongly: facial hair only for men, grey and
white hair mostly past 45, no hair described under a head covering, ``petite`` not for men. About 10^10
combinations exist, so 100k or a million draws are distinct after a handful of redraws.

The i-th description depends only on (seed, i): draws come in fixed-size chunks and duplicates are skipped in order,
so asking for more identities later keeps the first ones (a resumed or enlarged run keeps its folders).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LcmlaError

CHUNK = 4096  # draws per chunk; fixed so that the first N descriptions do not depend on how many are asked for
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")  # a user-given identity name is a folder name

GENDERS = ("man", "woman", "androgynous person")
ETHNICITIES = (
    "Korean", "Japanese", "Chinese", "Vietnamese", "Filipino", "Thai", "Indonesian", "Indian", "Pakistani",
    "Bangladeshi", "Nigerian", "Ethiopian", "Kenyan", "Ghanaian", "Somali", "Mexican", "Brazilian", "Peruvian",
    "Colombian", "Arab", "Persian", "Turkish", "Greek", "Italian", "Irish", "Scandinavian", "Polish", "Russian",
    "Native American", "Pacific Islander", "Afro-Caribbean", "mixed-race",
)  # fmt: skip
# Hair: "{colour}" is replaced by the colour; styles without it (shaved, bald) take none.
HAIR_STYLES = {
    "man": ("short {colour} hair", "cropped {colour} hair", "a {colour} buzz cut", "short curly {colour} hair",
            "wavy {colour} hair", "slicked-back {colour} hair", "shoulder-length {colour} hair", "{colour} dreadlocks",
            "a {colour} afro", "long {colour} hair in a ponytail", "a shaved head", "a bald head",
            "messy {colour} hair", "a {colour} undercut"),
    "woman": ("long straight {colour} hair", "long wavy {colour} hair", "shoulder-length {colour} hair",
              "a {colour} bob", "a {colour} pixie cut", "curly {colour} hair", "{colour} hair in a bun",
              "{colour} braids", "a {colour} afro", "{colour} hair in a ponytail", "short {colour} hair",
              "{colour} dreadlocks", "a shaved head", "a long layered {colour} cut"),
    "androgynous person": ("short {colour} hair", "a {colour} pixie cut", "a {colour} undercut",
                           "shoulder-length {colour} hair", "curly {colour} hair", "a shaved head",
                           "messy {colour} hair", "a {colour} bob"),
}  # fmt: skip
YOUNG_COLOURS = ("black", "dark brown", "brown", "light brown", "auburn", "red", "blonde", "platinum blonde",
                 "dyed blue", "dyed pink", "jet-black", "chestnut")  # fmt: skip
OLD_COLOURS = ("grey", "silver", "white", "salt-and-pepper", "greying brown", "greying black")
FACIAL_HAIR = ("", "", "", "a full beard", "a short beard", "a goatee", "a moustache", "stubble",
               "a handlebar moustache", "a long beard", "a chin-strap beard")  # fmt: skip
ACCESSORIES = ("", "", "", "round glasses", "thick-rimmed glasses", "wire-rimmed glasses", "reading glasses",
               "hoop earrings", "a nose ring", "a beanie", "a baseball cap", "a wide-brimmed hat",
               "a headscarf", "a turban", "a pearl necklace", "a scarf")  # fmt: skip
COVERS_HAIR = frozenset({"a headscarf", "a turban"})
BUILDS = ("", "", "slim", "athletic", "stocky", "heavyset", "muscular", "lanky", "broad-shouldered", "petite",
          "tall", "short")  # fmt: skip
EXPRESSIONS = ("smiling", "laughing", "with a neutral expression", "looking serious", "with a slight smile",
               "looking thoughtful", "grinning", "with a calm expression", "frowning slightly",
               "looking surprised")  # fmt: skip
AGES = (18, 86)  # drawn uniformly in [18, 86)


class IdentityListError(LcmlaError, ValueError):
    """A user's identity list that cannot be used (the message names the file and line)."""


@dataclass(frozen=True)
class Identity:
    """One person of the set: ``index`` in the list, the ``folder`` its images go to, its ``description``."""

    index: int
    folder: str
    description: str


def generate_descriptions(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct descriptions; the i-th depends only on ``seed`` and i."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"identities: expected a non-negative integer, got {count!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDE5C]))
    found: dict[str, None] = {}  # ordered set
    while len(found) < count:
        for description in _draw_chunk(rng):
            found.setdefault(description)
            if len(found) == count:
                break
    return list(found)


def _draw_chunk(rng: np.random.Generator) -> list[str]:
    def pick(options: tuple) -> np.ndarray:
        return rng.integers(len(options), size=CHUNK)

    ages = rng.integers(*AGES, size=CHUNK)
    genders = rng.choice(len(GENDERS), size=CHUNK, p=(0.46, 0.46, 0.08))
    ethnicities, builds, expressions = pick(ETHNICITIES), pick(BUILDS), pick(EXPRESSIONS)
    styles, facial, accessories = rng.random(CHUNK), pick(FACIAL_HAIR), pick(ACCESSORIES)
    young, old = pick(YOUNG_COLOURS), pick(OLD_COLOURS)
    greying = rng.random(CHUNK) < np.clip((ages - 40) / 40, 0.02, 0.9)  # grey is rare at 30, usual at 75
    descriptions = []
    for i in range(CHUNK):
        gender = GENDERS[genders[i]]
        build = BUILDS[builds[i]]
        if build == "petite" and gender == "man":
            build = ""
        accessory = ACCESSORIES[accessories[i]]
        colour = OLD_COLOURS[old[i]] if greying[i] else YOUNG_COLOURS[young[i]]
        hair_styles = HAIR_STYLES[gender]
        hair = "" if accessory in COVERS_HAIR else hair_styles[int(styles[i] * len(hair_styles))].format(colour=colour)
        beard = FACIAL_HAIR[facial[i]] if gender == "man" else ""
        person = " ".join(w for w in (build, f"{ages[i]}-year-old", ETHNICITIES[ethnicities[i]], gender) if w)
        features = [f for f in (hair, beard, accessory) if f]
        described = person if not features else f"{person} with {_join(features)}"
        descriptions.append(f"{_article(person)} {described}, {EXPRESSIONS[expressions[i]]}")
    return descriptions


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _article(phrase: str) -> str:
    """'an' before a vowel sound: 'an athletic', 'an 18-year-old', 'an 80-year-old'."""
    first = phrase.split()[0]
    return "an" if first[0] in "aeiou" or first.startswith(("8", "18-")) else "a"


def generated_identities(count: int, seed: int = 0) -> list[Identity]:
    return [Identity(i, f"identity_{i:07d}", d) for i, d in enumerate(generate_descriptions(count, seed))]


def read_identities(path: str | Path) -> list[Identity]:
    """A user's list: ``.txt`` (one description a line; blank lines and ``#`` comments skipped), ``.csv`` (a
    ``description`` column, optionally ``name``) or ``.jsonl`` (objects with ``description``, optionally ``name``).
    ``name`` becomes the identity's folder (default ``identity_<index>``). Descriptions and names must be unique:
    two equal labels would be one person to the trainer."""
    path = Path(path)
    if path.suffix.lower() not in (".txt", ".csv", ".jsonl"):
        raise IdentityListError(f"identities: {path}: expected a number, or a .txt, .csv or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise IdentityListError(f"identities: cannot read {path}: {error}") from None
    rows = _rows(path, text)
    if not rows:
        raise IdentityListError(f"identities: {path} lists no identity")
    identities, seen_descriptions, seen_names = [], {}, {}
    for index, (line, description, name) in enumerate(rows):
        where = f"identities: {path} line {line}"
        if not isinstance(description, str) or not description.strip():
            raise IdentityListError(f"{where}: the description is missing or empty")
        description = " ".join(description.split())
        folder = f"identity_{index:07d}" if name in (None, "") else name
        if not isinstance(folder, str) or not NAME.match(folder) or folder.endswith((" ", ".")):
            raise IdentityListError(f"{where}: name {folder!r} is not a folder name (letters, digits, ' ._-')")
        for seen, key, what in ((seen_descriptions, description, "description"), (seen_names, folder, "name")):
            if key in seen:
                raise IdentityListError(f"{where}: the same {what} as line {seen[key]}: {key!r}")
            seen[key] = line
        identities.append(Identity(index, folder, description))
    return identities


def _rows(path: Path, text: str) -> list[tuple[int, object, object]]:
    """(line number, description, name) of every entry."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [(n, line.strip(), None) for n, line in enumerate(text.splitlines(), 1)
                if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or "description" not in reader.fieldnames:
            raise IdentityListError(f"identities: {path} needs a header with a 'description' column")
        return [(reader.line_num, row["description"], row.get("name")) for row in reader]
    rows = []  # .jsonl
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise IdentityListError(f"identities: {path} line {n}: not JSON: {error}") from None
        if not isinstance(entry, dict):
            raise IdentityListError(f"identities: {path} line {n}: expected an object with 'description'")
        rows.append((n, entry.get("description"), entry.get("name")))
    return rows
