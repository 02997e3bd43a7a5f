"""A small synthetic face set in the authors' layout, for smoke runs, tests and benchmarks.

Each identity is a drawn face (skin, eye and mouth colours, face width) placed so that its eyes, nose and mouth sit at
the ArcFace template's positions, so ``faces.landmarks: template`` aligns it exactly. Files follow the authors'
convention: ``<Name>/vanilla/A_photo_of_conceptname_<seed>.jpg`` and ``<Name>/stylized/...``, listed in
``metadata.json``.

Usage: ``python -m lcmla_sdk.train.synthetic OUT_DIR [--identities 2] [--images 6] [--size 128] [--with-problems]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .faces import ARCFACE_SIZE, ARCFACE_TEMPLATE

STYLES = ("A_watercolor_painting_of_conceptname", "A_pencil_drawing_of_conceptname")


def draw_face(rng: np.random.Generator, traits: np.ndarray, size: int) -> Image.Image:
    """One image of the identity with ``traits`` (colours and shape), jittered per image by ``rng``."""
    scale = size / ARCFACE_SIZE
    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    skin, eyes, mouth = (tuple(int(c) for c in np.clip(traits[i : i + 3] + rng.normal(0, 8, 3), 0, 255)) for i in (0, 3, 6))
    half_width = (30 + 8 * traits[9] / 255) * scale
    centre_x, centre_y = 56 * scale, 68 * scale
    draw.ellipse([centre_x - half_width, centre_y - 44 * scale, centre_x + half_width, centre_y + 40 * scale], fill=skin)
    left_eye, right_eye, nose, mouth_left, mouth_right = ARCFACE_TEMPLATE * scale
    for x, y in (left_eye, right_eye):
        draw.ellipse([x - 5 * scale, y - 3 * scale, x + 5 * scale, y + 3 * scale], fill=eyes)
    draw.polygon([(nose[0], nose[1] - 10 * scale), (nose[0] - 4 * scale, nose[1]), (nose[0] + 4 * scale, nose[1])],
                 fill=tuple(int(0.7 * c) for c in skin))  # fmt: skip
    draw.line([tuple(mouth_left), tuple(mouth_right)], fill=mouth, width=max(1, round(3 * scale)))
    noise = rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_synthetic_dataset(
    root: str | Path, identities: int = 2, images: int = 6, size: int = 128, seed: int = 0, with_problems: bool = False
) -> Path:
    """Write the set under ``root``; return the path of its ``metadata.json``.

    ``with_problems`` adds what the loader must skip and count: an identity with a single image, an unreadable file
    and a file listed in the metadata but missing on disk.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    metadata: dict[str, str] = {}
    for person in range(identities):
        name = f"Person{person}"
        traits = rng.integers(0, 256, 10).astype(np.float64)
        for index in range(images):
            kind, prompt = ("stylized", STYLES[index % len(STYLES)]) if index % 3 == 2 else ("vanilla", "A_photo_of_conceptname")
            relative = f"{name}/{kind}/{prompt}_{int(rng.integers(10**5, 10**6))}.jpg"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            draw_face(rng, traits, size).save(root / relative, quality=95)
            metadata[relative] = name
    if with_problems:
        lonely = "Lonely/vanilla/A_photo_of_conceptname_111111.jpg"
        (root / lonely).parent.mkdir(parents=True, exist_ok=True)
        draw_face(rng, rng.integers(0, 256, 10).astype(np.float64), size).save(root / lonely)
        metadata[lonely] = "Lonely"
        broken = "Person0/vanilla/A_photo_of_conceptname_222222.jpg"
        (root / broken).write_bytes(b"this is not a JPEG file")
        metadata[broken] = "Person0"
        metadata["Person1/vanilla/A_photo_of_conceptname_333333.jpg"] = "Person1"  # listed, never written
    path = root / "metadata.json"
    path.write_text(json.dumps(metadata, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--identities", type=int, default=2)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-problems", action="store_true")
    args = parser.parse_args()
    print(write_synthetic_dataset(args.out, args.identities, args.images, args.size, args.seed, args.with_problems))


if __name__ == "__main__":
    main()
