"""Quickstart: personalize the bundled sample face with the tiny preset (runs on a CPU in seconds).

The tiny preset has random weights, so the pictures are noise; point ``from_pretrained`` at real weights
for faces. Usage: python examples/quickstart.py [OUT_DIR]
"""

import sys
from pathlib import Path

from lcmla_sdk import Personalizer
from lcmla_sdk.images import sample_face

out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/quickstart")
out.mkdir(parents=True, exist_ok=True)

personalizer = Personalizer.from_pretrained("tiny")
face = personalizer.encode_face(sample_face())  # encode once, reuse for every prompt
prompts = ["A photo of a face", "An oil painting of a face", "A cubism painting of a face"]
for mode in ("quality", "fast"):
    images = personalizer.generate(face, prompts, seed=0, mode=mode)
    for prompt, image in zip(prompts, images):
        path = out / f"{mode}-{prompt.lower().replace(' ', '_')}.png"
        image.save(path)
        print(path)
