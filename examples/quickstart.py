"""Quickstart: personalize a face with the tiny preset (runs on a CPU in seconds).

The tiny preset has random weights, so the pictures are noise; pass --model DIR (an lcmla model directory,
see `lcmla convert`) for faces. Usage: python examples/quickstart.py [--model tiny|DIR] [--face IMG] [--out DIR]
"""

import argparse
from pathlib import Path

from lcmla_sdk import Personalizer
from lcmla_sdk.images import sample_face

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="tiny")
parser.add_argument("--face", type=Path, help="face photo (default: the sample face shipped with lcmla)")
parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
parser.add_argument("--steps", type=int, help="denoising steps (default: by mode)")
args = parser.parse_args()

personalizer = Personalizer.from_pretrained(args.model)  # cuda + fp16 when there is a GPU, else cpu + fp32
face = args.face or sample_face()
images = personalizer.generate(face, "An oil painting of a face", seed=0, steps=args.steps)  # quality (DPM-Solver++)
images += personalizer.generate(face, "An oil painting of a face", seed=0, mode="fast", steps=args.steps)  # LCM
args.out.mkdir(parents=True, exist_ok=True)
for mode, image in zip(("quality", "fast"), images):
    image.save(args.out / f"{mode}.png")
    print(args.out / f"{mode}.png")
