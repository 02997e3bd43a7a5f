"""Personalize every face photo in a folder; photos without a usable face are reported and skipped.

Usage: python examples/batch_folder.py FACES_DIR [--model tiny|DIR] [--prompt TEXT] [--out DIR] [--steps N]
With a model directory that has a face pack, detection runs on every photo (`crop="face"` feeds the aligned crop).
"""

import argparse
from pathlib import Path

from lcmla_sdk import LcmlaError, Personalizer

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("faces", type=Path)
parser.add_argument("--model", default="tiny")
parser.add_argument("--prompt", default="A portrait of a face in the style of a renaissance painting")
parser.add_argument("--out", type=Path, default=Path("outputs/batch_folder"))
parser.add_argument("--steps", type=int, help="denoising steps (default: by mode)")
parser.add_argument("--mode", default="fast", choices=["quality", "fast"])
args = parser.parse_args()

personalizer = Personalizer.from_pretrained(args.model)
args.out.mkdir(parents=True, exist_ok=True)
photos = sorted(p for p in args.faces.iterdir() if p.suffix.lower() in SUFFIXES)
skipped = 0
for photo in photos:
    try:
        identity = personalizer.encode_face(photo)
    except LcmlaError as error:  # unreadable file, no face, ...: one line, and on to the next photo
        skipped += 1
        print(f"skipped {photo.name}: {error}")
        continue
    image = personalizer.generate(identity, args.prompt, seed=0, mode=args.mode, steps=args.steps)[0]
    image.save(args.out / f"{photo.stem}.png")
    print(args.out / f"{photo.stem}.png")
print(f"{len(photos) - skipped} of {len(photos)} photos personalized")
