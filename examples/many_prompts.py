"""One face, many prompts: encode the face once and reuse it for every prompt and both modes.

Usage: python examples/many_prompts.py [--model tiny|DIR] [--face IMG] [--out DIR] [--steps N]
(the tiny preset has random weights, so its pictures are noise; a model directory gives faces).
"""

import argparse
from pathlib import Path

from lcmla_sdk import Personalizer
from lcmla_sdk.images import sample_face

PROMPTS = [
    "A photo of a face",
    "An oil painting of a face",
    "A cubism painting of a face",
    "A face as a marble statue",
    "A watercolor portrait of a face, soft light",
]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="tiny")
parser.add_argument("--face", type=Path, help="face photo (default: the sample face shipped with lcmla)")
parser.add_argument("--out", type=Path, default=Path("outputs/many_prompts"))
parser.add_argument("--steps", type=int, help="denoising steps (default: by mode)")
args = parser.parse_args()

personalizer = Personalizer.from_pretrained(args.model)
identity = personalizer.encode_face(args.face or sample_face())  # the face work happens once, here
args.out.mkdir(parents=True, exist_ok=True)
for mode in ("quality", "fast"):
    # All prompts in one call: one batch through the networks; image i uses seed 0 + i.
    images = personalizer.generate(identity, PROMPTS, seed=0, mode=mode, steps=args.steps)
    for index, (prompt, image) in enumerate(zip(PROMPTS, images)):
        path = args.out / f"{mode}-{index}.png"
        image.save(path)
        print(f"{path}  {prompt}")
